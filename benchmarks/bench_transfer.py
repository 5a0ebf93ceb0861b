"""Bytes the Ray runtime moves per generation against the compute of one shard, and an estimate
of the scaling efficiency of the evaluators at G GPUs.

Measured (on the device of ``--device``; the CPU by default):

- bytes per generation: the weights (the trainer's ``state_dict``, BatchNorm buffers included),
  the energy batch (B x C x H x W float32 and B int64 labels), the candidate states (2S x D
  torch.bool, 1 byte each) and the energies (2S float32);
- the time of ``compute_energies`` on a shard of ceil(2S/G) states and the energy batch, for each
  G of ``--gpus`` and G = 1: what one of G evaluators computes per generation (on the CPU, shards
  over ``--measure-max-states``, default 32, are skipped: each state costs about a second there).

Estimated (a model with assumptions, printed as such):

    T(G) = compute(shard) + weights_time / k + batch_time + states_time + task_overhead
    efficiency(G) = T(1) / (G * T(G))

- compute(shard) = max(pass_floor, ceil(2S/G) * per_state_forward): on a GPU a forward pass has a
  floor (kernel launches) however few states it carries. per_state_forward is ``--gpu-forward-ms``;
  its default is derived from the MAC count and an assumed sustained ``--gpu-tflops``. With
  ``--device cuda`` the measured shard times are used instead.
- weights and the energy batch are published once to the object store of the trainer's node and
  fetched once per node (nodes of ``--gpus-per-node`` GPUs); inside a node every evaluator copies
  them at ``--intra-gbs``. Between nodes, two models: *source* (every remote node pulls from the
  trainer's node, whose link at ``--inter-gbs`` is shared: (nodes - 1) * bytes / bw) and *tree*
  (copies fan out, ceil(log2(nodes)) * bytes / bw). With staleness k (``--staleness``, the
  ``weights_every`` setting) the weights travel every k generations; their cost is averaged.
- the states go out from, and the energies come back to, the coordinator's node: all 2S x (D + 4)
  bytes over one link (inter-node when G spans nodes).
- the task overhead (``--task-overhead-ms``) is paid once per generation: shards run in parallel.

The same model is then solved for the smallest S (a power of 2) that reaches ``--target-eff``
(default 0.8) at each G and k: how large a population makes G GPUs pay off.

Not in T(G): the ``evolve_every`` training steps between generations, which run on one trainer
whatever G is (Amdahl's law lowers the end-to-end efficiency further), and the coordinator's
serial submission of G tasks.

Target: no fixed number was set. What to read: the shard compute must stay well above the time
to move the bytes (ratio >> 1) for the efficiency to stay near 1; the estimate is for ResNet-50 /
CIFAR-10 (32 px, 10 classes) at G = 8 and 64. 2S must be >= G, else GPUs idle: pass ``--S``.

    python benchmarks/bench_transfer.py [--model resnet50] [--S 16] [--batch 64]
        [--gpus 1,8,64] [--staleness 1,4] [--gpu-forward-ms X] [--gpu-tflops 200]
        [--pass-floor-ms 1.0] [--intra-gbs 10] [--inter-gbs 3] [--task-overhead-ms 2]
        [--device cpu|cuda] [--amp none|bf16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _common import add_common_args, csv, sync

from edrop_ray.energy import compute_energies
from edrop_ray.masking import Masker
from edrop_ray.models import build_model, example_input
from edrop_ray.slim import count_params_macs
from edrop_ray.units import discover_units

GB = 1e9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--S", type=int, default=16, help="population size; 2S candidates")
    p.add_argument("--batch", type=int, default=64, help="energy batch size")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--gpus", type=csv(int), default=[1, 8, 64], help="G values to estimate")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--staleness", type=csv(int), default=[1, 4], help="k = weights_every")
    p.add_argument(
        "--gpu-forward-ms",
        type=float,
        default=None,
        help="per-state forward time on one GPU (default: 2*MACs*batch / --gpu-tflops)",
    )
    p.add_argument("--gpu-tflops", type=float, default=200.0, help="assumed sustained TFLOP/s")
    p.add_argument(
        "--pass-floor-ms",
        type=float,
        default=1.0,
        help="assumed least time of one GPU forward pass (launches); 0 = the plain formula",
    )
    p.add_argument("--intra-gbs", type=float, default=10.0, help="GB/s inside a node")
    p.add_argument("--inter-gbs", type=float, default=3.0, help="GB/s between nodes (25 Gbit)")
    p.add_argument("--task-overhead-ms", type=float, default=2.0)
    p.add_argument("--device", default="cpu", help="where the shard compute is measured")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--measure-max-states",
        type=int,
        default=None,
        help="largest shard timed (default: 32 on the CPU, every shard on a GPU)",
    )
    p.add_argument("--target-eff", type=float, default=0.8, help="for the smallest-S table")
    add_common_args(p)
    return p.parse_args()


def measure_shards(model, masker, states, x, y, sizes, args, device) -> dict[int, float]:
    """Median seconds of ``compute_energies`` on the first n states, for each n in ``sizes``."""
    out: dict[int, float] = {}
    for n in sorted(set(sizes)):
        shard = states[:n]
        compute_energies(model, masker, shard, x, y, amp=args.amp)  # warm-up
        ts = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            compute_energies(model, masker, shard, x, y, amp=args.amp)
            sync(device)  # compute_energies returns CPU energies (a sync); this is belt and braces
            ts.append(time.perf_counter() - t0)
        out[n] = statistics.median(ts)
    return out


def broadcast_s(nbytes: float, nodes: int, args, mode: str) -> float:
    """Seconds to bring ``nbytes`` from the trainer's node to every evaluator of ``nodes`` nodes."""
    intra = nbytes / (args.intra_gbs * GB)
    if nodes <= 1:
        return intra
    hops = nodes - 1 if mode == "source" else math.ceil(math.log2(nodes))
    return hops * nbytes / (args.inter_gbs * GB) + intra


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA GPU is visible")

    size, n_cand = args.input_size, 2 * args.S
    model = build_model(args.model, num_classes=args.classes, in_channels=3)
    example = example_input(3, size)
    units = discover_units(model, example)
    params, macs = count_params_macs(model, example)
    model = model.to(device).eval()
    masker = Masker(model, units)
    D = units.num_units

    # --- bytes per generation, from the very tensors the actors send
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)  # int64, like the datasets
    batch_bytes = x.numel() * x.element_size() + y.numel() * y.element_size()
    states = torch.rand(n_cand, D, generator=g) < 0.5
    states_bytes = states.numel() * states.element_size()
    energies_bytes = n_cand * 4

    print(
        f"model={args.model} {size} px, {args.classes} classes: {params:,} params, "
        f"{macs / 1e6:.1f} MMACs/sample, D={D} units; S={args.S} -> 2S={n_cand} candidates, "
        f"energy batch {args.batch}"
    )
    print()
    print("bytes per generation (measured from the tensors):")
    rows = [
        ("weights (state_dict incl. BN buffers)", weights),
        (f"energy batch ({args.batch}x3x{size}x{size} f32 + labels i64)", batch_bytes),
        (f"states ({n_cand} x {D} bool)", states_bytes),
        (f"energies ({n_cand} f32)", energies_bytes),
    ]
    for label, nbytes in rows:
        print(f"  {label:<46} {nbytes:>12,} B  {nbytes / 1e6:>8.3f} MB")

    # --- measured shard compute
    x_dev, y_dev = x.to(device), y.to(device)
    shard_of = {G: math.ceil(n_cand / G) for G in sorted({1, *args.gpus})}
    cap = args.measure_max_states
    if cap is None:
        cap = n_cand if device.type == "cuda" else 32  # a CPU pass of many states takes minutes
    sizes = [n for n in shard_of.values() if n <= cap]
    t0 = time.perf_counter()
    measured = measure_shards(model, masker, states, x_dev, y_dev, sizes, args, device)
    where = f"{device}" + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
    print()
    print(
        f"compute_energies per shard, measured on {where}, amp={args.amp}, "
        f"median of {args.repeats} (took {time.perf_counter() - t0:.0f} s):"
    )
    print(
        f"  {'G':>4} {'states/shard':>12} {'shard s':>9} {'ms/state':>9} "
        f"{'moved/eval MB':>14} {'compute / move@intra':>21}"
    )
    for G, n in shard_of.items():
        # What one evaluator receives and returns in a generation that carries weights.
        moved = weights + batch_bytes + n * D + n * 4
        if n not in measured:
            print(f"  {G:>4} {n:>12} {'-':>9} (over --measure-max-states {cap})")
            continue
        ratio = measured[n] / (moved / (args.intra_gbs * GB))
        print(
            f"  {G:>4} {n:>12} {measured[n]:>9.3f} {1000 * measured[n] / n:>9.1f} "
            f"{moved / 1e6:>14.3f} {ratio:>20.0f}x"
        )

    # --- the GPU model of one shard's compute
    if device.type == "cuda":
        largest = max(measured)
        per_state_ms = 1000 * measured[largest] / largest
        # A one-state pass is the floor by definition, when it was measured.
        floor_ms = 1000 * measured[1] if 1 in measured else args.pass_floor_ms
        source = (
            f"MEASURED on {torch.cuda.get_device_name(device)}: shard times above "
            f"({per_state_ms:.3f} ms/state, {floor_ms:.3f} ms floor for other sizes)"
        )
    else:
        measured = {}  # CPU times say nothing about a GPU
        floor_ms = args.pass_floor_ms
        if args.gpu_forward_ms is not None:
            per_state_ms = args.gpu_forward_ms
            how = "(--gpu-forward-ms)"
        else:
            per_state_ms = 1000 * 2 * macs * args.batch / (args.gpu_tflops * 1e12)
            how = f"= 2 x {macs / 1e6:.0f} MMACs x {args.batch} / {args.gpu_tflops:g} TFLOP/s"
        source = (
            f"ASSUMED: {per_state_ms:.3f} ms per state {how}, "
            f"floor {floor_ms:g} ms per forward pass (--pass-floor-ms)"
        )

    def shard_s(n: int) -> float:
        if n in measured:
            return measured[n]
        return max(floor_ms, n * per_state_ms) / 1000

    def estimate(S: int, G: int, k: int, mode: str) -> tuple:
        """(nodes, states per shard, compute, weights/k, data, overhead, T) in seconds."""
        n = math.ceil(2 * S / G)
        nodes = math.ceil(G / args.gpus_per_node)
        w = broadcast_s(weights, nodes, args, mode) / k
        # States go out from and energies come back to the coordinator's node.
        bw = (args.inter_gbs if nodes > 1 else args.intra_gbs) * GB
        data = broadcast_s(batch_bytes, nodes, args, mode) + 2 * S * (D + 4) / bw
        over = args.task_overhead_ms / 1000
        c = shard_s(n) if S == args.S else max(floor_ms, n * per_state_ms) / 1000
        return nodes, n, c, w, data, over, c + w + data + over

    def efficiency(S: int, G: int, k: int, mode: str) -> float:
        return estimate(S, 1, k, mode)[-1] / (G * estimate(S, G, k, mode)[-1])

    print()
    print(f"GPU estimate of T(G); per-state forward time {source}.")
    print(
        f"ASSUMED: {args.intra_gbs:g} GB/s intra-node, {args.inter_gbs:g} GB/s inter-node, "
        f"{args.gpus_per_node} GPUs per node, {args.task_overhead_ms:g} ms Ray overhead per "
        "generation. MEASURED: the bytes above."
    )
    modes = {
        "source": "remote nodes all pull from the trainer's node",
        "tree": "copies fan out, ceil(log2(nodes)) inter-node hops",
    }
    for mode, what in modes.items():
        print()
        print(f"broadcast model '{mode}': {what}; S={args.S}")
        print(
            f"  {'G':>4} {'k':>3} {'nodes':>5} {'st/shard':>8} {'compute':>9} {'weights/k':>10} "
            f"{'batch+st':>9} {'overhead':>9} {'T(G) ms':>9} {'eff':>6}"
        )
        for k in args.staleness:
            for G in args.gpus:
                nodes, n, c, w, data, over, t = estimate(args.S, G, k, mode)
                print(
                    f"  {G:>4} {k:>3} {nodes:>5} {n:>8} {1000 * c:>9.3f} {1000 * w:>10.3f} "
                    f"{1000 * data:>9.3f} {1000 * over:>9.3f} {1000 * t:>9.3f} "
                    f"{efficiency(args.S, G, k, mode):>6.3f}"
                )
    idle = [G for G in args.gpus if G > n_cand]
    if idle:
        print()
        print(
            f"note: at G={idle} there are more GPUs than the 2S={n_cand} candidates; only "
            f"{n_cand} have work. Raise --S to at least G/2."
        )

    # The same model solved for S: how large a population makes G GPUs pay off.
    print()
    print(
        f"smallest S (a power of 2) with estimated eff >= {args.target_eff:g} "
        "(compute from the per-state time and floor above):"
    )
    print(f"  {'G':>4} {'k':>3} " + " ".join(f"{f'S ({m})':>14}" for m in modes))
    for k in args.staleness:
        for G in (G for G in args.gpus if G > 1):
            found = []
            for mode in modes:
                S = next(
                    (2**i for i in range(2, 21) if efficiency(2**i, G, k, mode) >= args.target_eff),
                    None,
                )
                # Not found: the states' transfer grows with S like the compute does, so the
                # efficiency has a ceiling; show where it stands at the top of the search.
                found.append(f"{S:,}" if S else f"none ({efficiency(2**20, G, k, mode):.2f})")
            print(f"  {G:>4} {k:>3} " + " ".join(f"{v:>14}" for v in found))
    print("  none (x): not reached up to S = 2^20, where the efficiency is x")
    print()
    print(
        "eff = T(1) / (G * T(G)); T(1) also pays the object-store round trip. The trainer's "
        "evolve_every steps per generation are not in T(G)."
    )


if __name__ == "__main__":
    main()
