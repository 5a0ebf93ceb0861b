"""The one run path: a typed run state (:class:`RunSpec`) and :func:`execute`.

``edrop-ray prune`` and ``resume``, the Python API, a Tune trial of ``edrop-ray sweep`` and the
EDropout arms of ``edrop-ray compare`` all run through :func:`execute`: the dense baseline
(optional), the search loop (in process or on Ray), checkpoints, the report and the artefacts.
A checkpoint is always the ``checkpoint.pt`` that :func:`edrop_ray.store.save_checkpoint`
writes, so every caller restores from it the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import store
from .budget import counter_for
from .config import Config, config_to_dict
from .learner import Learner, OwnModel, new_learner
from .loop import run_edropout
from .models import portable_copy
from .report import Progress, print_summary
from .search import Search
from .seeds import STREAMS_VERSION

__all__ = ["RunSpec", "RunOutcome", "execute", "replica_source"]


class RunOutcome(NamedTuple):
    """What a finished run leaves besides its folder: the report (report.json's contents), the
    physically slimmed model (CPU, as saved in pruned_model.pt), the final mask ((D,) bool) and
    the final measurement (:func:`~edrop_ray.loop.measure_pruned`'s numbers, test loss included).
    """

    report: dict[str, Any]
    model: nn.Module
    mask: torch.Tensor
    measured: dict[str, Any]


@dataclass
class RunSpec:
    """Everything one run needs.

    data: (train set, test set, DataInfo). own: a user's network (the Python API) or None for
    ``cfg.model``. run_dir: the folder the run writes (it exists). checkpoint: a blob of
    :func:`~edrop_ray.store.load_checkpoint` to continue from, or None for a new run. dense:
    train (or take from the cache) the dense baseline for the report; False leaves its numbers
    None (a Tune trial). on_generation: called with each generation's record after the run's
    own bookkeeping. on_checkpoint: called with ``run_dir`` and the training step after each
    ``checkpoint.pt``.
    """

    cfg: Config
    data: tuple
    device: torch.device
    run_dir: Path
    own: OwnModel | None = None
    checkpoint: dict[str, Any] | None = None
    quiet: bool = False
    dense: bool = True
    on_generation: Callable[[dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[Path, int], None] | None = None


def _start_runtime(cfg: Config, local: Learner, own: OwnModel | None, counter):
    """The Ray runtime, its actors asked for but not waited for (None in process): they boot
    while the driver trains the dense baseline.

    The actors build their replicas from :func:`replica_source`."""
    if cfg.backend == "local":
        return None
    from .distributed.runner import RayRuntime  # Ray is imported only when asked for

    return RayRuntime(
        cfg,
        local.info,
        local.units,
        counter=counter,
        own=own,
        model=replica_source(local, own),
        train_set=local.train_set,
        wait=False,
    )


def replica_source(local: Learner, own: OwnModel | None) -> OwnModel | None:
    """What the Ray actors build their replicas from: ``own`` (a user's network), else the
    :func:`~edrop_ray.models.portable_copy` of ``local``'s model (``cfg.model`` with its initial
    weights), else None (the actors build ``cfg.model`` by name)."""
    if own is not None:
        return own
    copy = portable_copy(local.model, local.example)
    return None if copy is None else OwnModel(copy, local.example)


def _restore(checkpoint, learner, search) -> tuple[list, list, float]:
    """(history, population snapshots, wall seconds so far): a checkpoint's, loaded into
    ``learner`` and ``search``, or a new run's (the initial population as snapshot 0)."""
    if checkpoint is None:
        p = search.population
        return [], store.snapshot_rows(0, p.states, p.energies), 0.0
    learner.load_state_dict(checkpoint["learner"])
    search.load_state_dict(checkpoint["search"])
    history, snapshots = list(checkpoint["history"]), list(checkpoint["snapshots"])
    return history, snapshots, float(checkpoint["wall_s"])


def execute(spec: RunSpec) -> RunOutcome:
    """Run (or continue) the run ``spec`` describes to its end; write every artefact of it."""
    cfg, run_dir, own = spec.cfg, Path(spec.run_dir), spec.own
    train_set, test_set, info = spec.data
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    # The dense cache and the artefacts are job's (imported here: job builds on this module).
    from .job import dense_baseline, finish_run

    # In process this learner trains; with Ray it only receives the final weights for the report.
    # Its budget counter is built first: a budget this model cannot take is refused in a line
    # before the dense baseline trains (the learner seeds its own weights, so order is moot).
    local = new_learner(cfg, train_set, info, spec.device, own)
    counter = counter_for(cfg, local.model, local.units, local.example)
    # On Ray the actors are asked for now and start while the dense baseline trains; whatever
    # fails from here on (Ctrl-C included) kills them in the `finally` below.
    runtime = _start_runtime(cfg, local, own, counter)
    timings: dict[str, float] = {}  # seconds per phase of this process (report.json)
    try:
        t = time.perf_counter()
        if spec.dense:
            dense = dense_baseline(cfg, spec.data, spec.device, own)
        else:
            dense = {"top1": None, "top5": None}
        timings["dense_s"] = time.perf_counter() - t
        if runtime is None:
            learner = local
            search = Search.from_config(cfg, local.units.num_units, counter=counter)
        else:
            runtime.wait_ready()
            learner, search = runtime.learner, runtime.search
            timings.update(runtime.timings)
        history, snapshots, wall_before = _restore(spec.checkpoint, learner, search)

        def save() -> None:
            store.write_history(run_dir / "history.parquet", history)
            store.write_population(run_dir / "population.parquet", snapshots)
            store.save_checkpoint(
                run_dir,
                {
                    "format": store.CHECKPOINT_FORMAT,
                    "streams": STREAMS_VERSION,  # the random streams the run draws from
                    "config": config_to_dict(cfg),
                    "learner": learner.state_dict(),
                    "search": search.state_dict(),
                    "history": history,
                    "snapshots": snapshots,
                    "wall_s": wall_before + time.perf_counter() - t0,
                },
            )
            if spec.on_checkpoint is not None:
                spec.on_checkpoint(run_dir, learner.step)

        progress = Progress(total=learner.total_steps, start=learner.step, quiet=spec.quiet)
        if runtime is not None and not spec.quiet:  # the header: how the weights travel
            progress.console.print(runtime.transport_line, highlight=False)
        t_run = time.perf_counter()

        def on_generation(record: dict[str, Any]) -> None:
            record["seconds"] = time.perf_counter() - t_run
            history.append(record)
            g = record["generation"]
            if cfg.snapshot_every and (g % cfg.snapshot_every == 0 or record["frozen"]):
                p = search.population
                snapshots.extend(store.snapshot_rows(g, p.states, p.energies))
            progress.generation(record, learner.step)
            if spec.on_generation is not None:
                spec.on_generation(record)

        guard = runtime.guard(str(run_dir)) if runtime is not None else contextlib.nullcontext()
        with progress, guard:
            run_edropout(learner, search, on_generation=on_generation, on_checkpoint=save)
        timings["search_s"] = time.perf_counter() - t_run
        if runtime is not None:
            learner = runtime.learner.to_local(local)
    except BaseException:
        if runtime is not None:
            runtime.shutdown()
        raise
    if runtime is not None:
        runtime.release()  # the actors go now; a Ray this run started stops meanwhile
    t = time.perf_counter()
    try:
        slim, m, report = finish_run(
            cfg, run_dir, learner, search, test_set, dense, history, snapshots, own=own
        )
        timings["finish_s"] = time.perf_counter() - t
    finally:
        if runtime is not None:
            t = time.perf_counter()
            runtime.shutdown()  # waits for that Ray to have stopped
            timings["ray_stop_wait_s"] = time.perf_counter() - t
    report["wall_s"] = wall_before + time.perf_counter() - t0
    report["weights_transport"] = runtime.transport_name if runtime is not None else "in process"
    report["timings"] = timings
    store.write_json(run_dir / "report.json", report)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: report.json is
    if not spec.quiet:
        print_summary(report)
    return RunOutcome(report, slim, search.best.clone(), m)
