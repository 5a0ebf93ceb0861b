"""Whole-run cost: an EDropout run against a dense run of the same epochs, and the Ray backend
against the in-process one, on the default config (digits, ResNet-18, 32 px).

Targets: EDropout / dense <= 2x (the settings that get there: a small energy batch, a
generation every ``evolve_every`` steps, and no more generations once the population has
converged); Ray / local <= 1.2x. Ratios are taken within one invocation; nothing is asserted.

    python benchmarks/bench_run.py [--set key=value ...] [--skip-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from edrop_ray.config import load_config
from edrop_ray.data import load_datasets
from edrop_ray.loop import Learner, run_dense, run_edropout
from edrop_ray.search import Search


def timed_local(cfg, data) -> tuple[float, float, Search]:
    """(dense seconds, EDropout seconds, the search) for one config, in process."""
    train_set, _test, info = data
    dense = Learner(cfg, train_set, info, torch.device("cpu"))
    t0 = time.perf_counter()
    run_dense(dense)
    t_dense = time.perf_counter() - t0
    learner = Learner(cfg, train_set, info, torch.device("cpu"))
    search = Search(cfg, learner.units.num_units)
    t0 = time.perf_counter()
    run_edropout(learner, search)
    return t_dense, time.perf_counter() - t0, search


def timed_prune(cfg, backend: str) -> float:
    """Wall seconds of the EDropout part of `edrop-ray prune` with a backend (dense cached)."""
    from edrop_ray import job

    with tempfile.TemporaryDirectory() as tmp:
        c = load_config(None, [f"{k}={v}" for k, v in _overrides(cfg, backend).items()])
        job.prune(c, Path(tmp) / "warm", quiet=True)  # fills the dense cache
        t0 = time.perf_counter()
        job.prune(c, Path(tmp) / "run", quiet=True)
        return time.perf_counter() - t0


def _overrides(cfg, backend):
    from dataclasses import asdict

    d = {k: v for k, v in asdict(cfg).items() if v is not None}
    d["backend"] = backend
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    cfg = load_config(None, args.overrides)
    data = load_datasets(cfg.dataset, data_root=cfg.data_root, input_size=cfg.input_size)
    print(f"config: {cfg.dataset} {cfg.model} epochs={cfg.epochs} S={cfg.population_size} "
          f"energy_batch={cfg.energy_batch_size} evolve_every={cfg.evolve_every} "
          f"patience={cfg.patience} threads={torch.get_num_threads()}")  # fmt: skip
    t_dense, t_edrop, search = timed_local(cfg, data)
    print(f"dense run            {t_dense:8.1f} s")
    print(f"EDropout run         {t_edrop:8.1f} s  ({search.generation} generations, "
          f"frozen at {search.converged_at})")  # fmt: skip
    print(f"EDropout / dense     {t_edrop / t_dense:8.2f}x  (target <= 2x)")
    if args.skip_ray:
        return
    t_local = timed_prune(cfg, "local")
    t_ray = timed_prune(cfg, "ray")
    print(f"prune, local backend {t_local:8.1f} s")
    print(f"prune, Ray backend   {t_ray:8.1f} s  (includes starting a local Ray instance)")
    print(f"Ray / local          {t_ray / t_local:8.2f}x  (target <= 1.2x)")


if __name__ == "__main__":
    main()
