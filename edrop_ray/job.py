"""One prune job end to end: data, dense baseline, EDropout, slimming, and every artefact.

This is what ``edrop-ray prune`` and ``edrop-ray resume`` run: the checks, the run folder, and
the one run path (:func:`edrop_ray.run.execute`), which drives the search in process
(:func:`edrop_ray.loop.run_edropout`) or on the Ray runtime; both write the same run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__, store
from .budget import budget_report
from .config import Config, config_from_dict, config_to_dict, dense_key, validate
from .data import load_for
from .errors import RunInterrupted, UserError
from .learner import Learner, OwnModel, resolve_device
from .loop import measure_pruned, run_dense
from .report import write_plots
from .run import RunOutcome, RunSpec, execute
from .seeds import STREAMS_VERSION
from .slim import kept_per_layer, save_pruned

__all__ = [
    "prune",
    "run_new",
    "RunOutcome",
    "RunSpec",
    "execute",
    "resume",
    "dense_baseline",
    "train_dense",
    "load_data",
    "check_inputs",
    "finish_run",
]


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
    # version (a new version may train differently), the random streams' version (a new
    # derivation gives other initial weights and data order) and the data's fingerprint.
    fingerprint = data_fingerprint(train_set, test_set)
    key = f"{dense_key(cfg)}-{__version__}-s{STREAMS_VERSION}-{fingerprint}"
    return _cache_dir() / "dense" / f"{key}.json"


def train_dense(learner: Learner, test_set, *, cache: bool = True) -> dict[str, Any]:
    """Train ``learner`` dense for its whole budget, evaluate it, and record the result as the
    cached dense baseline of its config (``edrop-ray compare`` keeps the trained model).
    ``cache=False`` records nothing (a user's own model: the key does not know its code)."""
    t0 = time.perf_counter()
    run_dense(learner)
    result = learner.evaluate(test_set, None)
    result["wall_s"] = time.perf_counter() - t0
    if not cache:
        return result
    path = dense_cache_path(learner.cfg, learner.train_set, test_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_json(path, result)
    return result


def dense_baseline(
    cfg: Config, data, device: torch.device, own: OwnModel | None = None
) -> dict[str, Any]:
    """Top-1/Top-5 of the dense model trained with the same budget; cached per config and seed.

    With ``own`` (a user's network) it is a copy of that network trained dense from the weights
    it holds, never cached: the cache key holds names, not the user's code and weights."""
    train_set, test_set, info = data
    if own is not None:
        return train_dense(own.learner(cfg, train_set, info, device), test_set, cache=False)
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


def load_data(cfg: Config):
    """:func:`load_for`, with any unreadable data file turned into one UserError line."""
    try:
        return load_for(cfg)
    except UserError:
        raise
    # torchvision asserts on a bad idx header; PIL, pickle and numpy raise their own errors
    except (AssertionError, ValueError, RuntimeError, OSError, EOFError, KeyError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"dataset {cfg.dataset!r} under {cfg.data_root!r} cannot be read ({reason}); "
            "replace its files with the originals or pass --set download=true"
        ) from None


def check_inputs(cfg: Config, data, *, names: bool = True) -> torch.device:
    """Every check of a run's input that needs the data or the machine; writes nothing.
    ``names=False``: the model and data are the user's own, not names of the registries."""
    validate(cfg, names=names)
    train_set, _test_set, _info = data
    if len(train_set) < cfg.batch_size:
        raise UserError(
            f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} "
            f"images of {cfg.dataset!r}); lower --set batch_size"
        )
    device = resolve_device(cfg.device)
    if cfg.backend == "ray":
        check_ray_address(cfg)
    return device


def check_ray_address(cfg: Config) -> None:
    """A given Ray address must answer within ``ray_connect_timeout_s`` (no endless retry)."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    source = "ray_address" if cfg.ray_address else "RAY_ADDRESS"
    host_port = address.split("://", 1)[-1].rstrip("/")
    if not address or address in ("auto", "local") or ":" not in host_port:
        return  # auto/local: Ray finds (or starts) the cluster itself, and says so when it fails
    host, _, port = host_port.rpartition(":")
    if not port.isdigit():
        raise UserError(f"{source} {address!r} must be host:port (e.g. 127.0.0.1:6379)")
    t = cfg.ray_connect_timeout_s
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=t).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"nothing answers at {source} {address!r} ({reason}, waited up to {t:g} s); start "
            "the cluster (ray start --head) or fix the address (ray_connect_timeout_s: the wait)"
        ) from None


def prune(cfg: Config, out: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run EDropout with ``cfg`` into the folder ``out``; return the report.

    Every check runs before the first file is written. A run already in ``out`` (with
    ``overwrite``) stays untouched until the new one is complete: the new run is written to
    ``OUT.new`` and swapped in at the end. A new run that fails before its first checkpoint is
    removed, so the disk is as it was.
    """
    return run_new(cfg, out, overwrite=overwrite, quiet=quiet).report


def run_new(
    cfg: Config,
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    data=None,
    own: OwnModel | None = None,
) -> RunOutcome:
    """:func:`prune`, returning the slimmed model and the mask with the report.

    ``data`` ((train, test, DataInfo)) replaces the data named by ``cfg.dataset``, and ``own``
    the model named by ``cfg.model`` (the Python API: :func:`edrop_ray.prune`).
    """
    names = own is None
    validate(cfg, names=names)
    store.check_out(out, overwrite=overwrite)
    data = load_data(cfg) if data is None else data
    device = check_inputs(cfg, data, names=names)
    run_dir = store.stage_out(out, config=config_to_dict(cfg))
    try:
        store.write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
        outcome = _execute(cfg, run_dir, data, device, checkpoint=None, quiet=quiet, own=own)
    except BaseException as e:
        kept = store.abandon_out(run_dir)
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted(run_dir if kept else None, Path(out)) from None
        raise
    store.commit_out(run_dir)
    return outcome


def resume(run_dir: str | Path, *, quiet: bool = False) -> dict:
    """Continue a stopped run from its last checkpoint to the same result as an unbroken run."""
    path = store.open_resumable(run_dir)
    blob = store.load_checkpoint(path)
    started = blob.get("config")
    if isinstance(started, dict) and str(started.get("model", "")).startswith("custom:"):
        raise UserError(
            f"run {str(path)!r} pruned your own network ({started['model'][7:]}) from Python; "
            "resume cannot rebuild it: run edrop_ray.prune(..., out=..., overwrite=True) again"
        )
    cfg = config_from_dict(started, f"the checkpoint of {str(path)!r}")
    _check_config_file(path, blob["config"])
    check_streams(blob, path)
    data = load_data(cfg)
    device = check_inputs(cfg, data)
    marker = store.read_marker(path)
    if marker.get("replaces"):  # a staged --overwrite run: its target must still be replaceable
        store.check_out(path.parent / marker["replaces"], overwrite=True)
    try:
        report = _execute(cfg, path, data, device, checkpoint=blob, quiet=quiet).report
    except KeyboardInterrupt:
        raise RunInterrupted(path, path) from None
    store.commit_out(path)
    return report


def check_streams(blob: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose run drew from other random streams (:mod:`edrop_ray.seeds`):
    its data order and dropout would change mid-run, so it could not end where an unbroken run
    does. Checkpoints without the field predate the named streams (version 0)."""
    written = blob.get("streams", 0)
    if written != STREAMS_VERSION:
        raise UserError(
            f"the checkpoint of {str(path)!r} was written with random streams version {written}, "
            f"this edrop_ray draws from version {STREAMS_VERSION}; resuming would not reproduce "
            "the run. Finish it with the edrop_ray that started it, or start a new run"
        )


def _check_config_file(path: Path, started: dict[str, Any]) -> None:
    """Resume runs the checkpoint's config: refuse a config.yaml that says otherwise."""
    try:
        on_disk = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{str(path / 'config.yaml')!r} cannot be read ({type(e).__name__}); "
                        "restore it as the run wrote it") from None  # fmt: skip
    on_disk = on_disk if isinstance(on_disk, dict) else {}
    missing = object()
    for key in sorted(set(started) | set(on_disk), key=str):
        if on_disk.get(key, missing) != started.get(key, missing):
            raise UserError(
                f"config.yaml of {str(path)!r} says {key}: {on_disk.get(key)!r} but the run "
                f"started with {key}: {started.get(key)!r}; resume continues the run as it "
                "started: restore config.yaml, or start a new run with the new config"
            )


def _execute(
    cfg: Config,
    run_dir: Path,
    data,
    device: torch.device,
    *,
    checkpoint: dict | None,
    quiet: bool,
    own: OwnModel | None = None,
) -> RunOutcome:
    """A prune or resume run through the one run path, dense baseline included."""
    spec = RunSpec(
        cfg, data, device, run_dir, own=own, checkpoint=checkpoint, quiet=quiet, dense=True
    )
    return execute(spec)


def finish_run(cfg, run_dir, learner, search, test_set, dense, history, snapshots, *, own=None):
    """The end of every run (:func:`edrop_ray.run.execute`): evaluate, slim and save the final
    model; write history, population, mask and plots. Returns (the slimmed model, the
    measurement, the report without its wall times)."""
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
        input_shape=None if own is None else tuple(own.example.shape[1:]),
    )
    store.save_torch(run_dir / "mask.pt", {"mask": final, "layers": learner.units.layer_of_units()})
    store.write_history(run_dir / "history.parquet", history)
    store.write_population(run_dir / "population.parquet", snapshots)
    write_plots(run_dir, history)
    return (
        slim,
        m,
        {
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
        },
    )
