"""One prune job end to end: data, dense baseline, EDropout, slimming, and every artefact.

This is what ``edrop-ray prune`` and ``edrop-ray resume`` run. The search itself is driven either
in process (:func:`edrop_ray.loop.run_edropout`) or by the Ray runtime; both write the same run
directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, store
from .budget import budget_report, counter_for
from .config import Config, config_to_dict, dense_key, validate
from .data import load_for
from .errors import UserError
from .loop import Learner, measure_pruned, resolve_device, run_dense, run_edropout
from .report import Progress, print_summary, write_plots
from .search import Search
from .slim import kept_per_layer, save_pruned

__all__ = ["prune", "resume", "dense_baseline", "train_dense"]


def _cache_dir() -> Path:
    return Path(os.environ.get("EDROP_RAY_CACHE", Path.home() / ".cache" / "edrop_ray"))


def data_fingerprint(train_set, test_set, samples: int = 16) -> str:
    """A short hash of what the data holds: sizes, and a fixed spread of samples from each set
    (every sample of an in-memory TensorDataset). A changed data set gets a new dense baseline."""
    h = hashlib.sha256()
    for dataset in (train_set, test_set):
        n = len(dataset)
        h.update(str(n).encode())
        tensors = getattr(dataset, "tensors", None)
        if tensors is not None:
            items = [t.contiguous() for t in tensors]
        else:
            idx = sorted({int(i) for i in torch.linspace(0, n - 1, min(samples, n))})
            items = [torch.as_tensor(v) for i in idx for v in dataset[i]]
        for t in items:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dense_cache_path(cfg: Config, train_set, test_set) -> Path:
    # The key holds the config fields that change what the dense model learns, the package
    # version (a new version may train differently) and the data's fingerprint.
    key = f"{dense_key(cfg)}-{__version__}-{data_fingerprint(train_set, test_set)}"
    return _cache_dir() / "dense" / f"{key}.json"


def train_dense(learner: Learner, test_set) -> dict[str, Any]:
    """Train ``learner`` dense for its whole budget, evaluate it, and record the result as the
    cached dense baseline of its config (``edrop-ray compare`` keeps the trained model)."""
    t0 = time.perf_counter()
    run_dense(learner)
    result = learner.evaluate(test_set, None)
    result["wall_s"] = time.perf_counter() - t0
    path = dense_cache_path(learner.cfg, learner.train_set, test_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_json(path, result)
    return result


def dense_baseline(cfg: Config, data, device: torch.device) -> dict[str, Any]:
    """Top-1/Top-5 of the dense model trained with the same budget; cached per config and seed."""
    train_set, test_set, _info = data
    path = dense_cache_path(cfg, train_set, test_set)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = None  # a damaged cache entry is recomputed, never trusted
        if isinstance(cached, dict) and all(
            isinstance(cached.get(k), int | float) for k in ("top1", "top5")
        ):
            return cached
    train_set, test_set, info = data
    return train_dense(Learner(cfg, train_set, info, device), test_set)


def _start_backend(cfg: Config, local: Learner):
    """(learner, search, runtime) for the chosen backend; runtime is None in process."""
    counter = counter_for(cfg, local.model, local.units, local.example)
    if cfg.backend == "local":
        return local, Search(cfg, local.units.num_units, counter=counter), None
    from .distributed.runner import RayRuntime  # Ray is imported only when asked for

    runtime = RayRuntime(cfg, local.info, local.units.num_units, counter=counter)
    return runtime.learner, runtime.search, runtime


def prune(cfg: Config, out: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run EDropout with ``cfg`` into the folder ``out``; return the report."""
    data = load_for(cfg)  # data errors surface here, before anything is written
    device = resolve_device(cfg.device)
    run_dir = store.prepare_run_dir(out, overwrite=overwrite)
    store.write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    return _execute(cfg, run_dir, data, device, checkpoint=None, quiet=quiet)


def resume(run_dir: str | Path, *, quiet: bool = False) -> dict:
    """Continue a stopped run from its last checkpoint to the same result as an unbroken run."""
    path = store.open_run_dir(run_dir)
    blob = store.load_checkpoint(path)
    cfg = validate(Config(**blob["config"]))
    if (path / "report.json").is_file():
        raise UserError(
            f"run {str(path)!r} already finished (report.json exists); nothing to resume"
        )
    data = load_for(cfg)
    return _execute(cfg, path, data, resolve_device(cfg.device), checkpoint=blob, quiet=quiet)


def _execute(cfg, run_dir: Path, data, device, *, checkpoint: dict | None, quiet: bool) -> dict:
    train_set, test_set, info = data
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.perf_counter()
    dense = dense_baseline(cfg, data, device)

    # In process this learner trains; with Ray it only receives the final weights for the report.
    local = Learner(cfg, train_set, info, device)
    learner, search, runtime = _start_backend(cfg, local)
    history: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    wall_before = 0.0
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
                "format": "edrop_ray.checkpoint/1",
                "config": config_to_dict(cfg),
                "learner": learner.state_dict(),
                "search": search.state_dict(),
                "history": history,
                "snapshots": snapshots,
                "wall_s": wall_before + time.perf_counter() - t0,
            },
        )

    progress = Progress(total=learner.total_steps, start=learner.step, quiet=quiet)
    if runtime is not None and not quiet:  # the header: how the weights travel
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

    try:
        guard = runtime.guard(str(run_dir)) if runtime is not None else contextlib.nullcontext()
        with progress, guard:
            run_edropout(learner, search, on_generation=on_generation, on_checkpoint=save)
        if runtime is not None:
            learner = runtime.learner.to_local(local)
    finally:
        if runtime is not None:
            runtime.shutdown()
    report = _finish(cfg, run_dir, learner, search, test_set, dense, history, snapshots)
    report["wall_s"] = wall_before + time.perf_counter() - t0
    report["weights_transport"] = runtime.transport_name if runtime is not None else "in process"
    store.write_json(run_dir / "report.json", report)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: report.json is
    if not quiet:
        print_summary(report)
    return report


def _finish(cfg, run_dir, learner, search, test_set, dense, history, snapshots) -> dict:
    """Evaluate, slim and save the final model; write history, population, mask and plots."""
    final = search.best.clone()
    recalibration = {}
    if cfg.bn_recalibrate:
        before = learner.evaluate(test_set, final)
        used = learner.recalibrate_bn(final, cfg.bn_recalibrate)
        recalibration = {
            "bn_recalibrate_batches": used,
            "top1_before_bn_recalibrate": before["top1"],
        }
    slim, m = measure_pruned(learner, test_set, final)
    info = learner.info
    save_pruned(
        run_dir / "pruned_model.pt",
        slim,
        model_name=cfg.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=cfg.input_size,
        small_input=cfg.small_input,
        state=final,
    )
    store.save_torch(run_dir / "mask.pt", {"mask": final, "layers": learner.units.layer_of_units()})
    store.write_history(run_dir / "history.parquet", history)
    store.write_population(run_dir / "population.parquet", snapshots)
    write_plots(run_dir, history)
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "backend": cfg.backend,
        "dense_top1": dense["top1"],
        "dense_top5": dense["top5"],
        "pruned_top1": m["top1"],
        "pruned_top5": m["top5"],
        **{k: m[k] for k in ("params_dense", "params_pruned", "prune_rate", "macs_dense")},
        **{k: m[k] for k in ("macs_pruned", "kept_units", "num_units")},
        **budget_report(cfg, m),
        "kept_per_layer": kept_per_layer(learner.units, final),
        "generations": search.generation,
        "converged_at": search.converged_at,
        "steps": learner.step,
        "dense_wall_s": dense.get("wall_s"),
        **recalibration,
    }
