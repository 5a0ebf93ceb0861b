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
from .report import Progress, print_summary
from .search import Search
from .seeds import STREAMS_VERSION

__all__ = ["RunSpec", "RunOutcome", "execute"]


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


def _start_backend(cfg: Config, local: Learner, own: OwnModel | None, counter):
    """(learner, search, runtime) for the chosen backend; runtime is None in process."""
    if cfg.backend == "local":
        return local, Search.from_config(cfg, local.units.num_units, counter=counter), None
    from .distributed.runner import RayRuntime  # Ray is imported only when asked for

    runtime = RayRuntime(
        cfg, local.info, local.units.num_units, counter=counter, own=own, train_set=local.train_set
    )
    return runtime.learner, runtime.search, runtime


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
    if spec.dense:
        dense = dense_baseline(cfg, spec.data, spec.device, own)
    else:
        dense = {"top1": None, "top5": None}
    learner, search, runtime = _start_backend(cfg, local, own, counter)
    history: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    wall_before = 0.0
    checkpoint = spec.checkpoint
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        search.load_state_dict(checkpoint["search"])
        history = list(checkpoint["history"])
        snapshots = list(checkpoint["snapshots"])
        wall_before = float(checkpoint["wall_s"])
    else:
        snapshots += store.snapshot_rows(0, search.population.states, search.population.energies)

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

    try:
        guard = runtime.guard(str(run_dir)) if runtime is not None else contextlib.nullcontext()
        with progress, guard:
            run_edropout(learner, search, on_generation=on_generation, on_checkpoint=save)
        if runtime is not None:
            learner = runtime.learner.to_local(local)
    finally:
        if runtime is not None:
            runtime.shutdown()
    slim, m, report = finish_run(
        cfg, run_dir, learner, search, test_set, dense, history, snapshots, own=own
    )
    report["wall_s"] = wall_before + time.perf_counter() - t0
    report["weights_transport"] = runtime.transport_name if runtime is not None else "in process"
    store.write_json(run_dir / "report.json", report)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: report.json is
    if not spec.quiet:
        print_summary(report)
    return RunOutcome(report, slim, search.best.clone(), m)
