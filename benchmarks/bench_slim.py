"""Inference latency of the dense model against physically slimmed copies, on the CPU.

For each model (``--models``, default ResNet-18 and SqueezeNet1_1, 32 px, 10 classes) a random
pruning state keeping each unit with probability ``--keep`` (default 0.5 and 0.3) is slimmed with
``slim_model``. Measured: parameters and MACs per sample (``count_params_macs``), and the latency
of one forward pass (eval, no_grad) at each batch size (``--batches``, default 1 and 64). Printed:
the ratios slim / dense of parameters, MACs and latency.

Target: the latency ratio follows the MAC ratio, i.e. slimming buys real speed and not only a
smaller parameter count. A random state is a harsh test: it keeps units evenly over all layers,
whereas a learned state usually keeps more of the cheap late layers than of the costly early ones.

Each repeat runs ``max(1, 64 // batch)`` forward passes (so that batch 1 is not timed on one
sub-millisecond call); the median of ``--repeats`` is reported after one warm-up repeat, and the
dense and slim variants alternate within each repeat to spread out load from other processes.
As a correctness check the largest difference between the slim model's logits and the masked
dense model's logits is printed.

    python benchmarks/bench_slim.py [--models resnet18,squeezenet1_1] [--keep 0.5,0.3]
                                    [--batches 1,64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_common_args, csv
from torch import nn

from edrop_ray.masking import Masker
from edrop_ray.models import build_model, example_input
from edrop_ray.slim import count_params_macs, slim_model
from edrop_ray.units import discover_units

INPUT_SIZE = 32
NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv(str), default=["resnet18", "squeezenet1_1"])
    p.add_argument("--keep", type=csv(float), default=[0.5, 0.3], help="kept fraction of units")
    p.add_argument("--batches", type=csv(int), default=[1, 64])
    p.add_argument("--repeats", type=int, default=5)
    add_common_args(p)
    return p.parse_args()


@torch.no_grad()
def timed(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds per forward pass, averaged over ``iters`` passes."""
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - t0) / iters


@torch.no_grad()
def slim_error(model: nn.Module, units, state: torch.Tensor, slim: nn.Module) -> float:
    """Largest |slim logits - masked dense logits| on a random batch."""
    x = torch.randn(8, 3, INPUT_SIZE, INPUT_SIZE)
    masker = Masker(model, units)
    try:
        with masker.applied(state):
            masked = model(x)
    finally:
        masker.remove()  # the dense model is timed afterwards: no hooks left on it
    return float((slim(x) - masked).abs().max())


def bench_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    example = example_input(3, INPUT_SIZE)
    model = build_model(name, num_classes=NUM_CLASSES, in_channels=3).eval()
    units = discover_units(model, example)
    g = torch.Generator().manual_seed(args.seed)

    variants: dict[str, nn.Module] = {"dense": model}
    info: dict[str, tuple[int, int, int, float]] = {}
    params, macs = count_params_macs(model, example)
    info["dense"] = (units.num_units, params, macs, 0.0)
    for keep in args.keep:
        state = torch.rand(units.num_units, generator=g) < keep
        slim = slim_model(model, units, state, example).eval()
        p, m = count_params_macs(slim, example)
        label = f"keep {keep:.0%}"
        variants[label] = slim
        info[label] = (int(state.sum()), p, m, slim_error(model, units, state, slim))

    latency: dict[tuple[str, int], float] = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g)
        iters = max(1, 64 // batch)
        for v in variants.values():  # warm-up repeat
            timed(v, x, iters)
        runs: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.repeats):
            for label, v in variants.items():
                runs[label].append(timed(v, x, iters))
        for label, ts in runs.items():
            latency[label, batch] = statistics.median(ts)

    print(f"== {name}  ({units.num_units} units, {INPUT_SIZE} px, threads={args.threads})")
    head = f"{'variant':<10} {'units':>6} {'params':>11} {'MMACs':>8} {'max|d|':>8}"
    for batch in args.batches:
        head += f" {f'ms@b{batch}':>10}"
    # The last columns are ratios slim / dense ("/d").
    head += f" {'params/d':>8} {'MACs/d':>7}"
    for batch in args.batches:
        head += f" {f'lat/d@b{batch}':>10}"
    print(head)
    _, p0, m0, _ = info["dense"]
    for label in variants:
        kept, p, m, err = info[label]
        shown = "-" if label == "dense" else f"{err:.1e}"
        row = f"{label:<10} {kept:>6} {p:>11,} {m / 1e6:>8.1f} {shown:>8}"
        for batch in args.batches:
            row += f" {1000 * latency[label, batch]:>10.2f}"
        row += f" {p / p0:>8.3f} {m / m0:>7.3f}"
        for batch in args.batches:
            row += f" {latency[label, batch] / latency['dense', batch]:>10.3f}"
        print(row)
    print()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"repeats={args.repeats} (median), keep={args.keep}, batches={args.batches}")
    print()
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
