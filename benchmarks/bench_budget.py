"""The cost of the exact params/MACs count per generation, as a ratio to one energy evaluation.

For each model (32 px, 10 classes), with 2S random states (p = 0.5 kept):

- energies: ``compute_energies`` of the 2S states on one batch (the generation's judging);
- count:    ``Counter.count`` of the same 2S states (exact params and MACs of each slimmed model);
- repair:   ``repair_budget`` of the 2S states to ``target_macs`` (what a budget adds to a
            generation: a binary search of about log2(D) counts);
- setup:    ``build_counter`` once (one probing forward pass, the dense count and one verifying
            slim), next to one ``slim_model`` + Torch-Pruning count, which a per-state count
            would pay 2S times per generation.

Medians of ``--repeats`` after one warm-up, round-robin.

    python benchmarks/bench_budget.py [--models resnet18,resnet50] [--states 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_common_args, csv

from edrop_ray.budget import build_counter, repair_budget
from edrop_ray.energy import compute_energies
from edrop_ray.masking import Masker
from edrop_ray.models import build_model
from edrop_ray.slim import count_params_macs, slim_model
from edrop_ray.units import discover_units


def timed(repeats: int, fn, *args, **kwargs) -> float:
    fn(*args, **kwargs)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv(str), default=["resnet18", "resnet50"])
    p.add_argument("--states", type=int, default=32, help="2S candidates of a generation")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=5)
    add_common_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    print(f"threads={args.threads} states={args.states} batch={args.batch}")
    print("| model | D | energies (ms) | count (ms) | repair (ms) | count/energies | "
          "repair/energies | build_counter (s) | one slim+count (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = build_model(name, num_classes=10, in_channels=1).eval()
        x = torch.randn(args.batch, 1, 32, 32, generator=g)
        y = torch.randint(10, (args.batch,), generator=g)
        units = discover_units(model, x[:2])
        t0 = time.perf_counter()
        counter = build_counter(model, units, x[:2])
        setup = time.perf_counter() - t0
        states = torch.rand(args.states, units.num_units, generator=g) < 0.5
        t0 = time.perf_counter()
        count_params_macs(slim_model(model, units, states[0], x[:2]), x[:2])
        one_slim = time.perf_counter() - t0
        masker = Masker(model, units)
        max_macs = int(args.target_macs * counter.dense_macs)
        rg = torch.Generator().manual_seed(0)
        t_energy = timed(args.repeats, compute_energies, model, masker, states, x, y)
        t_count = timed(args.repeats * 20, counter.count, states)
        t_repair = timed(
            args.repeats * 4, repair_budget, states, counter, max_macs=max_macs, generator=rg
        )
        masker.remove()
        print(
            f"| {name} | {units.num_units} | {1e3 * t_energy:.1f} | {1e3 * t_count:.3f} | "
            f"{1e3 * t_repair:.2f} | {t_count / t_energy:.2e} | {t_repair / t_energy:.2e} | "
            f"{setup:.2f} | {one_slim:.2f} |"
        )


if __name__ == "__main__":
    main()
