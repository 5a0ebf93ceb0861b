"""Batched vs looped energy evaluation, and the masking overhead over a plain dense forward.

Measured, on one model and one batch of random images (``--batch``, 32 px, 10 classes), with
``--states`` random pruning states (p = 0.5 kept):

- batched:   ``compute_energies`` with every state in one forward pass (states_per_pass=0);
- spp=8:     ``compute_energies`` with 8 states per forward pass;
- looped:    ``compute_energies_looped``, one forward pass per state;
- dense:     the same states*batch samples through a copy of the model that has no masker hooks
             (eval, no_grad), i.e. the cost of the forward pass alone.

Targets: batched is >= 5x faster than looped, and batched / dense <= 1.10x (the masks, the batch
replication and the loss cost at most 10 % over the bare forward pass).

On a CPU the 5x is not expected: a CPU conv at batch 64 is already compute-bound, so one pass over
2048 samples costs at best what 32 passes over 64 do, and it can cost more (the 32 px stem
activations of 2048 samples are ~0.5 GB each, so the big pass is paid in page faults and memory
traffic). The speed-up comes from a GPU, where a batch of 64 small images leaves most of the device
idle; run with ``--device cuda`` there.

Each repeat runs every mode once, round-robin, so that load from other processes is spread over
all modes; the median of ``--repeats`` is reported after one warm-up run of each mode.

    python benchmarks/bench_energy.py [--model resnet18] [--states 32] [--batch 64]
                                      [--repeats 3] [--device cpu|cuda] [--amp none|bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from _common import add_common_args, sync
from torch import nn

from edrop_ray.energy import compute_energies, compute_energies_looped
from edrop_ray.masking import Masker
from edrop_ray.models import build_model, example_input
from edrop_ray.units import discover_units

INPUT_SIZE = 32
NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--states", type=int, default=32, help="number of candidate states (2S)")
    p.add_argument("--batch", type=int, default=64, help="energy batch size")
    p.add_argument("--states-per-pass", type=int, default=8, help="the extra chunked row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--json", help="also write the figures to this JSON file (gpu_check.sh)")
    add_common_args(p)
    return p.parse_args()


def dense_forward(
    model: nn.Module, xs: torch.Tensor, device: torch.device, amp: str
) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp == "bf16"):
        return model(xs)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA GPU is visible")

    model = build_model(args.model, num_classes=NUM_CLASSES, in_channels=3)
    units = discover_units(model, example_input(3, INPUT_SIZE))
    # The dense reference is copied before the masker exists, so it carries no hooks at all.
    dense_model = copy.deepcopy(model).to(device).eval()
    model = model.to(device).eval()
    masker = Masker(model, units)

    g = torch.Generator().manual_seed(args.seed)
    states = torch.rand(args.states, units.num_units, generator=g) < 0.5
    x = torch.randn(args.batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    # Replicated outside the timed region: the dense row is the bare forward pass.
    xs = x.repeat(args.states, 1, 1, 1)

    spp = args.states_per_pass
    modes: dict[str, Callable[[], object]] = {
        "batched (all states, 1 pass)": lambda: compute_energies(
            model, masker, states, x, y, amp=args.amp
        ),
        f"states_per_pass={spp}": lambda: compute_energies(
            model, masker, states, x, y, states_per_pass=spp, amp=args.amp
        ),
        "looped (1 state per pass)": lambda: compute_energies_looped(
            model, masker, states, x, y, amp=args.amp
        ),
        "dense, no hooks": lambda: dense_forward(dense_model, xs, device, args.amp),
    }

    times: dict[str, list[float]] = {name: [] for name in modes}
    # Warm-up, one run of each mode: allocator, oneDNN/cuDNN primitives for each shape.
    warm = {name: fn() for name, fn in modes.items()}
    sync(device)
    # Sanity, not an assertion: batched and looped must judge the states alike.
    e_batched, _, e_looped, _ = warm.values()
    max_diff = float((e_batched - e_looped).abs().max())
    del warm  # the dense logits of every sample: free them before timing
    for _ in range(args.repeats):
        for name, fn in modes.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    n_samples = args.states * args.batch
    print(
        f"model={args.model} units={units.num_units} states={args.states} batch={args.batch} "
        f"({n_samples} samples) device={device} amp={args.amp} threads={args.threads} "
        f"repeats={args.repeats}"
    )
    print(f"max |energy batched - looped| = {max_diff:.2e}")
    print()
    print(f"{'mode':<30} {'median s':>9} {'min s':>8} {'ms/state':>9} {'samples/s':>10}")
    for name, ts in times.items():
        m = med[name]
        print(
            f"{name:<30} {m:>9.3f} {min(ts):>8.3f} {1000 * m / args.states:>9.2f} "
            f"{n_samples / m:>10.0f}"
        )
    names = list(modes)
    batched, chunked, looped, dense = (med[n] for n in names)
    print()
    ratios = [
        ("speed-up batched vs looped", f"{looped / batched:.2f}x", "(target >= 5x)"),
        (f"speed-up spp={spp} vs looped", f"{looped / chunked:.2f}x", ""),
        ("batched / dense time", f"{batched / dense:.3f}x", "(target <= 1.10x)"),
        (f"spp={spp} / dense time", f"{chunked / dense:.3f}x", ""),
    ]
    for label, value, target in ratios:
        print(f"{label + ':':<32} {value:>7}  {target}")
    if args.json:
        figures = {
            "model": args.model,
            "units": units.num_units,
            "states": args.states,
            "batch": args.batch,
            "device": str(device),
            "amp": args.amp,
            "threads": args.threads,
            "repeats": args.repeats,
            "max_abs_energy_diff_batched_vs_looped": max_diff,
            "median_s": {
                "batched": batched,
                f"states_per_pass_{spp}": chunked,
                "looped": looped,
                "dense": dense,
            },
            "speedup_batched_vs_looped": looped / batched,
            "batched_over_dense": batched / dense,
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
