"""Whole-run cost on the default config (digits, ResNet-18, 32 px), three runs in one process:

1. the dense baseline (same epochs, same data order, no masking),
2. `edrop-ray prune --backend local` (the dense baseline now cached),
3. `edrop-ray prune --backend ray` (a private local Ray instance, started inside the timing).

Targets: EDropout / dense <= 2x (what gets there: a small energy batch, a generation every
``evolve_every`` steps, and no generations once the population has converged); Ray / local <=
1.2x. Ratios are taken within one invocation; nothing is asserted.

    python benchmarks/bench_run.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from edrop_ray import job
from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.learner import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDROP_RAY_CACHE"] = str(Path(tmp) / "cache")  # a cold dense cache
        local = load_config(None, [*args.overrides, "backend=local"])
        ray_cfg = load_config(None, [*args.overrides, "backend=ray"])
        print(
            f"config: {local.dataset} {local.model} epochs={local.epochs} "
            f"S={local.population_size} energy_batch={local.energy_batch_size} "
            f"evolve_every={local.evolve_every} patience={local.patience} "
            f"threads={torch.get_num_threads()}"
        )
        data = load_for(local)
        t0 = time.perf_counter()
        dense = job.dense_baseline(local, data, resolve_device(local.device))
        t_dense = time.perf_counter() - t0

        times, reports = {}, {}
        for name, cfg in (("local", local), ("ray", ray_cfg)):
            t0 = time.perf_counter()
            reports[name] = job.prune(cfg, Path(tmp) / name, quiet=True)
            times[name] = time.perf_counter() - t0
    r = reports["local"]
    print(f"dense run (train + test)       {t_dense:7.1f} s   top1 {dense['top1']:.2f}")
    print(
        f"EDropout run, local backend    {times['local']:7.1f} s   top1 {r['pruned_top1']:.2f}"
        f"  prune rate {100 * r['prune_rate']:.1f}%  generations {r['generations']}"
        f" (converged at {r['converged_at']})"
    )
    print(f"EDropout run, Ray backend      {times['ray']:7.1f} s   (starts Ray inside the timing)")
    print(f"EDropout / dense               {times['local'] / t_dense:7.2f}x  (target <= 2x)")
    print(f"Ray / local                    {times['ray'] / times['local']:7.2f}x  (target <= 1.2x)")
    same = reports["ray"]["pruned_top1"] == r["pruned_top1"]
    print(f"same pruned Top-1 on both backends: {same}")
    print(json.dumps({"dense_s": t_dense, **{f"{k}_s": v for k, v in times.items()}}))


if __name__ == "__main__":
    main()
