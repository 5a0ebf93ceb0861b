"""Weak and strong scaling of the population across evaluators: components measured on real
evaluator processes, and the efficiency at 8 and 64 GPUs extrapolated from them.

MEASURED, here, on real Ray actors (a trainer and N = 1, 2 evaluator processes, weights by one
gloo broadcast per generation; ``--model`` at ``--input-size``, default ResNet-18 16 px on
digits), at fixed S (strong: ``--S``) and fixed S per evaluator (weak: ``--S-per-eval`` x N),
per generation (medians after a warm-up):

- trainer step (the driver's round trip to the trainer actor);
- weight sync: bytes and seconds (the coordinator's wall time for publish + receive, or, when
  the weights go out in the judging round, the slowest receiver's time in the broadcast);
- batch and population: their bytes, and the trainer's time to send each rank its header and
  batch in the group exchange; that time is also inside "control" below;
- each rank's proposal of its members' trials (the slowest rank's);
- energy compute per evaluator (inside the evaluator, max and mean over shards);
- gather and selection: (evaluate wall - slowest rank's receive + propose + compute) + select
  + the driver's round trip to the coordinator, together "control";
- idle: the fraction of a cycle (generation + training step) an evaluator is not computing.

Also MEASURED: the gloo broadcast of the ResNet-50 32 px buffer (``--target-model``) between
processes of this machine (1 and 2 receivers), and the effect of ``weights_dtype: bf16`` on the
energies of a briefly trained model.

EXTRAPOLATED to ``--target-model`` at ``--target-input`` on GPUs, with every input named:

    cycle(N, S) = train + judge(N, S) + control(N) + coord(S)
    judge(N, S) = sync(N) + inputs(N, S) + answers(N, S) + propose(S, S/N) + compute(2S/N)
    (pipeline: true:  max(train, judge(N, S)) + control(N) + coord(S))
    weak(N)   = cycle(1, s) / cycle(N, s N)          (s = --target-S-per-eval, default 16)
    strong(N) = cycle(1, S) / (N cycle(N, S))        (S = --target-S, default 64)

- compute and train: from a GPU check JSON (``--gpu-json``, keys ``energy_ms_per_candidate`` and
  ``train_step_ms``) when given, else from FLOPs: 2 x MACs x batch per candidate (x 3 for a
  training step) at an ASSUMED ``--gpu-tflops`` sustained, with an ASSUMED floor per pass;
- sync(N) = bytes / bandwidth + latency x ceil(log2(N + 1)) (NCCL broadcast, pipelined):
  ASSUMED ``--intra-gbs`` inside a node of ``--gpus-per-node`` and ``--inter-gbs`` across nodes;
- inputs(N, S): the energy batch and the population, bit-packed (S x D / 8 bytes), one broadcast
  to the ranks every generation, as sync(N); answers(N, S): the ranks' energies and trials
  gathered at rank 0, all of them through its link, plus one latency;
- propose(S, m): one rank's proposal of its m = ceil(S / N) members' trials (unpack the
  population, propose from the members' own random streams, pack the trials), and coord(S):
  the coordinator's own work (pack the population, unpack the trials, select), both MEASURED
  in this process on one thread at the target's unit count;
- control(N) = a + b (N - 1), fitted (least squares) to the wall time MEASURED with
  ``--control-evaluators`` (default 1,2,4,8) evaluators that judge next to nothing (ResNet-18 at
  8 px, 2 states of 2 images per evaluator, weights sent once): Ray's round trips, the
  exchange, gather and selection without the compute runs' contention. Beside it, the CPU
  seconds each process spent (Linux schedstat, all threads, around each generation only): the
  chain every generation runs through in turn (driver, coordinator, trainer: rank 0 sends,
  receives and unpacks for each rank) and the busiest evaluator. Their slopes say whether the
  wall slope is CPU work or queueing for the 2 shared cores. The compute runs' fit (N = 1, 2,
  contended) is printed beside them. A second model, "rank-0 CPU", ASSUMES evaluators on cores
  of their own: the same intercept, growing only by the chain's CPU per evaluator. A third,
  "rank-0 exchange", grows by rank 0's CPU per rank in the exchange alone, MEASURED with
  ``--control-evaluators`` ranks that answer at once, on another core than rank 0's
  (:func:`measure_exchange`): the only per-rank work of the chain.

N counts evaluator GPUs; the trainer has its own GPU in addition.

    python benchmarks/bench_scale.py [--evaluators 1,2] [--generations 6] [--S 8] [--S-per-eval 4]
        [--gpu-tflops 200] [--intra-gbs 100] [--inter-gbs 25] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import statistics
import time
from pathlib import Path

import torch
from _common import add_common_args, cpu_seconds, csv, emit

from edrop_ray.cluster import start_private_instance
from edrop_ray.config import load_config
from edrop_ray.distributed.transport import FlatWeights, GroupMember
from edrop_ray.files import pack_rows, unpack_rows
from edrop_ray.models import build_model, example_input
from edrop_ray.search import Search
from edrop_ray.slim import count_params_macs
from edrop_ray.units import discover_units

MS = 1e3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--energy-batch", type=int, default=32)
    p.add_argument("--evaluators", type=csv(int), default=[1, 2])
    p.add_argument("--S", type=int, default=8, help="strong scaling: fixed population")
    p.add_argument("--S-per-eval", type=int, default=4, help="weak scaling: S per evaluator")
    p.add_argument("--generations", type=int, default=6, help="timed, after 2 warm-up")
    p.add_argument("--control-evaluators", type=csv(int), default=[1, 2, 4, 8])
    p.add_argument("--target-model", default="resnet50")
    p.add_argument("--target-input", type=int, default=32)
    p.add_argument("--target-batch", type=int, default=64)
    p.add_argument("--target-S", type=int, default=64)
    p.add_argument("--target-S-per-eval", type=int, default=16)
    p.add_argument("--gpu-json", default="", help="figures of benchmarks/gpu_check.sh")
    p.add_argument("--gpu-tflops", type=float, default=200.0, help="ASSUMED sustained TFLOP/s")
    p.add_argument("--pass-floor-ms", type=float, default=1.0, help="ASSUMED least pass time")
    p.add_argument("--intra-gbs", type=float, default=100.0, help="ASSUMED NCCL GB/s, in a node")
    p.add_argument("--inter-gbs", type=float, default=25.0, help="ASSUMED NCCL GB/s, across")
    p.add_argument("--latency-us", type=float, default=20.0, help="ASSUMED per broadcast hop")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--out", default="", help="also write the tables (markdown) here")
    add_common_args(p)
    return p.parse_args()


# --- measured: real evaluator processes


def start_runtime(cfg):
    """The Ray runtime of ``cfg`` (its actors started and ready) and the data's DataInfo."""
    from edrop_ray.data import load_for
    from edrop_ray.distributed.runner import RayRuntime
    from edrop_ray.units import discover_units

    _train, _test, info = load_for(cfg)
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels)
    units = discover_units(model, example_input(info.in_channels, cfg.input_size))
    return RayRuntime(cfg, info, units), info


def measure_run(n: int, s: int, args) -> dict[str, float]:
    """Medians per generation of a Ray run with ``n`` evaluators and population ``s``."""
    import ray

    cfg = load_config(
        None,
        [
            "dataset=digits", f"model={args.model}", f"input_size={args.input_size}",
            f"population_size={s}", f"energy_batch_size={args.energy_batch}", "evolve_every=1",
            f"num_evaluators={n}", f"cpu_threads={args.threads}", "trainer_cpus=1",
            "backend=ray", "weights_transport=collective", "patience=100000",
            "diversity_threshold=0", f"seed={args.seed}",
        ],
    )  # fmt: skip
    runtime, info = start_runtime(cfg)
    try:
        learner, search = runtime.learner, runtime.search
        cycles, trains, gens = [], [], []
        for _ in range(2 + args.generations):
            t0 = time.perf_counter()
            search.run_generation(learner)
            t1 = time.perf_counter()
            learner.train(search.best)
            t2 = time.perf_counter()
            cycles.append(t2 - t0)
            gens.append(t1 - t0)
            trains.append(t2 - t1)
        timings, syncs = ray.get(runtime.coordinator.timing_log.remote(), timeout=120)
    finally:
        runtime.shutdown()
    w = slice(2, None)  # drop the warm-up (group formation, first imports)
    tm = timings[w]
    comp_max = [max(t["compute_s"]) for t in tm]
    comp_mean = [statistics.mean(t["compute_s"]) for t in tm]
    # the weights' sync: a round of its own (sync_s), or inside the judging round, where the
    # slowest receiver's wait for the broadcast is it (receive_s)
    sync = [t["sync_s"] + max(t.get("receive_s") or [0.0]) for t in tm]
    busy = [_busiest(t) for t in tm]
    control = [g - t["sync_s"] - b for g, t, b in zip(gens[w], tm, busy, strict=True)]
    med = statistics.median
    states_bytes = s * math.ceil(runtime.units.num_units / 8)  # the population, broadcast
    batch_bytes = (
        args.energy_batch * info.in_channels * args.input_size**2 * 4 + 8 * args.energy_batch
    )
    return {
        "N": n,
        "S": s,
        "cycle_s": med(cycles[w]),
        "train_s": med(trains[w]),
        "sync_s": med(sync),
        "sync_bytes": syncs[-1]["bytes"],
        "broadcast_s": med(x["broadcast_s"] for x in syncs[1:] or syncs),
        "compute_max_s": med(comp_max),
        "compute_mean_s": med(comp_mean),
        "control_s": med(control),
        "select_s": med(t["propose_s"] + t["select_s"] for t in tm),
        # the slowest rank's proposal of its members' trials (over the group)
        "rank_propose_s": med(max(t["proposed_s"] or [0.0]) for t in tm),
        "batch_bytes": batch_bytes,
        # the trainer's time to send every rank its header and batch (group exchange)
        "inputs_s": med(t.get("inputs_s", float("nan")) for t in tm),
        "states_bytes": states_bytes,
        "idle": 1.0 - med(comp_mean) / med(cycles[w]),
    }


def _busiest(t: dict) -> float:
    """The slowest rank's seconds in a generation: receiving weights, proposing its members'
    trials (over the group) and computing energies."""
    n = len(t["compute_s"])
    return max(
        r + p + c
        for r, p, c in zip(t.get("receive_s") or [0.0] * n, t.get("proposed_s") or [0.0] * n,
                           t["compute_s"], strict=True)
    )  # fmt: skip


def measure_control(n: int, args, generations: int = 12) -> dict[str, float]:
    """Control seconds per generation with ``n`` evaluators that judge next to nothing (the
    driver's generation wall time less the slowest shard's compute; weights sent once), and
    the CPU seconds each process spent on it: the chain every generation runs through in turn
    (driver, coordinator, trainer: rank 0 of the exchange) and the evaluators (the busiest).
    CPU is read from /proc around each generation only, so the training steps are left out."""
    import ray

    cfg = load_config(
        None,
        [
            "dataset=digits", "model=resnet18", "input_size=8", f"population_size={max(4, n)}",
            "energy_batch_size=2", "evolve_every=1", f"num_evaluators={n}",
            f"cpus_per_evaluator={2 / n}", "cpu_threads=1", "trainer_cpus=1", "backend=ray",
            "weights_transport=collective", "weights_every=1000000", "patience=100000",
            "diversity_threshold=0", f"seed={args.seed}",
        ],
    )  # fmt: skip

    def pid(_actor) -> int:  # defined here: pickled by value, run in the actor
        return os.getpid()

    runtime, info = start_runtime(cfg)
    try:
        chain = [os.getpid(), ray.get(runtime.coordinator.__ray_call__.remote(pid), timeout=60)]
        chain.append(ray.get(runtime.trainer.identity.remote(), timeout=60)["pid"])
        evals = [i["pid"] for i in runtime.identities()]
        gens, chain_cpu, eval_cpu, roles = [], [], [], []
        for _ in range(2 + generations):
            e0, c0 = [cpu_seconds(p) for p in evals], [cpu_seconds(p) for p in chain]
            t0 = time.perf_counter()
            runtime.search.run_generation(runtime.learner)
            gens.append(time.perf_counter() - t0)
            c1, e1 = [cpu_seconds(p) for p in chain], [cpu_seconds(p) for p in evals]
            chain_cpu.append(sum(c1) - sum(c0))
            roles.append([b - a for a, b in zip(c0, c1, strict=True)])
            eval_cpu.append(max(b - a for a, b in zip(e0, e1, strict=True)))
            runtime.learner.train(runtime.search.best)
        timings, _syncs = ray.get(runtime.coordinator.timing_log.remote(), timeout=120)
    finally:
        runtime.shutdown()
    med = statistics.median
    return {
        "wall_s": med(
            g - t["sync_s"] - _busiest(t) for g, t in zip(gens[2:], timings[2:], strict=True)
        ),
        "chain_cpu_s": med(chain_cpu[2:]),
        "eval_cpu_s": med(eval_cpu[2:]),
        "driver_cpu_s": med(r[0] for r in roles[2:]),
        "coordinator_cpu_s": med(r[1] for r in roles[2:]),
        "trainer_cpu_s": med(r[2] for r in roles[2:]),
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept at x = 1, slope) of the least-squares line, the slope floored at 0."""
    if len(xs) < 2:
        return ys[0], 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    slope = max(0.0, slope)
    return my - slope * (mx - 1), slope


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver(port: int, rank: int, world: int, name: str, size: int, repeats: int) -> None:
    torch.set_num_threads(1)
    model = build_model(name, num_classes=10, in_channels=3)
    member = GroupMember(model, torch.device("cpu"), "fp32", bind=True)
    member.join(("127.0.0.1", port), rank, world, "gloo", 300.0, epoch=0)
    for v in range(repeats):
        member.receive(v, 0)
    member.leave()


def measure_gloo_broadcast(name: str, receivers: int, repeats: int = 3) -> tuple[int, float]:
    """(bytes, median seconds) of one fp32 broadcast of ``name``'s buffer on this machine."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    world = receivers + 1
    kids = [
        ctx.Process(target=_receiver, args=(port, r, world, name, 32, repeats), daemon=True)
        for r in range(1, world)
    ]
    for k in kids:
        k.start()
    model = build_model(name, num_classes=10, in_channels=3)
    member = GroupMember(model, torch.device("cpu"), "fp32", bind=False)
    member.join(("127.0.0.1", port), 0, world, "gloo", 300.0, epoch=0)
    times = [member.publish(v, 0, pack=True)["broadcast_s"] for v in range(repeats)]
    member.leave()
    for k in kids:
        k.join(timeout=120)
    return member.nbytes, statistics.median(times)


def _pin(cores: set[int]) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, cores & os.sched_getaffinity(0) or os.sched_getaffinity(0))


def _answerer(port: int, rank: int, world: int) -> None:
    """Ranks 1..N of :func:`measure_exchange`: answer every request at once (zero energies,
    the trials left as padding), off rank 0's core."""
    _pin(set(range(1, os.cpu_count() or 1)))
    torch.set_num_threads(1)
    member = GroupMember(torch.nn.Linear(1, 1), torch.device("cpu"), "fp32", bind=True)
    member.join(("127.0.0.1", port), rank, world, "gloo", 300.0, epoch=0)
    while (req := member.next_request(0)) is not None:
        count = len(req.members)
        trials = torch.zeros(count, req.rows.shape[1], dtype=torch.uint8)
        member.reply(req, torch.zeros(2 * count), trials, (0.0, 0.0, 0.0))
    member.leave()


def measure_exchange(n: int, units: int, repeats: int = 40) -> dict[str, float]:
    """Rank 0's side of the group exchange alone (:meth:`GroupMember.request`, gloo) with ``n``
    ranks that answer at once: wall and rank 0's CPU (all its threads) per exchange, medians.
    What travels is next to nothing (2 members of ``units`` bits per rank, 2 images of 8 px):
    this is the cost per message; the bytes are the bandwidth terms' (on NCCL a DMA, here a
    TCP copy). Rank 0 runs on core 0 and the ranks on the others, so rank 0's CPU is its own
    work per rank, not the ranks' contention for its core."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    kids = [ctx.Process(target=_answerer, args=(port, r, n + 1), daemon=True)
            for r in range(1, n + 1)]  # fmt: skip
    for k in kids:
        k.start()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: a second thread would only spin beside the first
    _pin({0})
    try:
        member = GroupMember(torch.nn.Linear(1, 1), torch.device("cpu"), "fp32", bind=False)
        member.join(("127.0.0.1", port), 0, n + 1, "gloo", 300.0, epoch=0)
        member.home.pack()
        rows = torch.zeros(2 * n, math.ceil(units / 8), dtype=torch.uint8)
        x, y = torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64)
        member.request(0, 0, rows, x, y, generation=0, send_weights=True)
        walls, cpus = [], []
        for g in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            member.request(0, 0, rows, x, y, generation=g, send_weights=False)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        member.stop(0, list(range(1, n + 1)))
        member.leave()
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
        for k in kids:
            k.join(timeout=120)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def measure_bf16_energies(args) -> dict[str, float]:
    """Energies of 2S random states with fp32 and with bf16-rounded weights of the same model,
    briefly trained (so BN statistics and weights are not the initial ones)."""
    from edrop_ray.data import load_for
    from edrop_ray.learner import Learner

    cfg = load_config(None, ["dataset=digits", f"model={args.model}",
                             f"input_size={args.input_size}", "backend=local"])  # fmt: skip
    train, _test, info = load_for(cfg)
    learner = Learner(cfg, train, info, torch.device("cpu"))
    for _ in range(20):
        learner.train(None)
    x, y = learner.energy_batch()
    g = torch.Generator().manual_seed(args.seed)
    states = torch.rand(16, learner.units.num_units, generator=g) < 0.5
    states[0] = True
    e32 = learner.energies(states, x, y)
    flat = FlatWeights(learner.model, device=torch.device("cpu"), dtype=torch.bfloat16)
    flat.pack()
    with torch.no_grad():
        for view, (_, t) in zip(flat.views, flat.entries, strict=True):
            t.copy_(view)
    e16 = learner.energies(states, x, y)
    diff = (e16 - e32).abs()
    order32, order16 = e32.argsort(), e16.argsort()
    flips = sum(
        int((e32[i] < e32[j]) != (e16[i] < e16[j]))
        for i in range(len(e32))
        for j in range(i + 1, len(e32))
    )
    return {
        "mean_energy": float(e32.mean()),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / e32.abs()).max()),
        "pair_order_flips": flips,
        "pairs": len(e32) * (len(e32) - 1) // 2,
        "same_best": bool(order32[0] == order16[0]),
    }


def measure_de(units: int, shapes: list[tuple[int, int]], seed: int, repeats: int = 3) -> dict:
    """The DE's work per generation over the process group at population ``S`` and ``units``
    bits per state, in this process on one thread (medians after one), for each ``(S, m)`` of
    ``shapes``:

    - ``coordinator[S]``: pack the population for the broadcast, unpack the trials that came
      back, select (diversity and median included);
    - ``rank[(S, m)]``: one evaluator's proposal of ``m`` members' trials: unpack the
      population, propose (parents, mutation, crossover: the members' own random streams),
      pack the trials.
    """
    med = statistics.median
    coordinator, rank = {}, {}
    for size in sorted({s for s, _ in shapes}):
        cfg = load_config(
            None, [f"population_size={size}", "diversity_threshold=0", f"seed={seed}"]
        )
        search = Search.from_config(cfg, units)
        own = []
        for _ in range(1 + repeats):
            everyone = search.proposer.trials(search.population.states, range(size),
                                              search.generation)  # fmt: skip
            packed = pack_rows(everyone)  # what the ranks send back, together
            t0 = time.perf_counter()
            pack_rows(search.population.states)
            search.take_trials(unpack_rows(packed, units))
            search.select(torch.rand(2 * size))
            own.append(time.perf_counter() - t0)
        coordinator[size] = med(own[1:])
        rows = pack_rows(search.population.states)
        for m in sorted({m for s, m in shapes if s == size}):
            theirs = []
            for _ in range(1 + repeats):
                t0 = time.perf_counter()
                states = unpack_rows(rows, units)
                pack_rows(search.proposer.trials(states, range(m), search.generation))
                theirs.append(time.perf_counter() - t0)
            rank[(size, m)] = med(theirs[1:])
    return {"coordinator": coordinator, "rank": rank}


# --- extrapolated


def target_inputs(args) -> dict[str, float]:
    model = build_model(args.target_model, num_classes=10, in_channels=3)
    _params, macs = count_params_macs(model, example_input(3, args.target_input))
    units = discover_units(model, example_input(3, args.target_input)).num_units
    nbytes = FlatWeights(model, device=torch.device("cpu"), dtype=torch.float32).nbytes
    src = "ASSUMED from FLOPs"
    per_cand_s = 2 * macs * args.target_batch / (args.gpu_tflops * 1e12)
    train_s = max(3 * args.pass_floor_ms / MS, 3 * per_cand_s)
    if args.gpu_json and Path(args.gpu_json).is_file():
        import json

        figures = json.loads(Path(args.gpu_json).read_text())
        if "energy_ms_per_candidate" in figures:
            per_cand_s = figures["energy_ms_per_candidate"] / MS
            train_s = figures.get("train_step_ms", train_s * MS) / MS
            src = f"MEASURED in {args.gpu_json}"
    batch_bytes = args.target_batch * (3 * args.target_input**2 * 4 + 8)  # fp32 x, int64 y
    return {"macs": macs, "bytes": nbytes, "units": units, "per_cand_s": per_cand_s,
            "train_s": train_s, "batch_bytes": batch_bytes, "compute_source": src,
            "batch": args.target_batch, "input": args.target_input}  # fmt: skip


def _gbs(n: int, args) -> float:
    return args.intra_gbs if n + 1 <= args.gpus_per_node else args.inter_gbs


def sync_s(n: int, nbytes: float, args) -> float:
    return nbytes / (_gbs(n, args) * 1e9) + args.latency_us * 1e-6 * math.ceil(math.log2(n + 1))


def inputs_s(n: int, s: int, t: dict, args) -> float:
    """The batch and the population (bit-packed), one broadcast to the ranks every
    generation, NCCL as for the weights."""
    return sync_s(n, t["batch_bytes"] + s * math.ceil(t["units"] / 8), args)


def answers_s(n: int, s: int, t: dict, args) -> float:
    """The ranks' answers gathered at rank 0 (energies as float64 and the trials,
    bit-packed): all of them through rank 0's link, and one hop."""
    nbytes = s * (16 + math.ceil(t["units"] / 8))
    return nbytes / (_gbs(n, args) * 1e9) + args.latency_us * 1e-6


def cycle_s(n: int, s: int, t: dict, control, args, pipeline: bool = False) -> float:
    """One generation and its training step. ``pipeline``: the trainer's step runs while the
    evaluators judge on the weights from before it (``pipeline: true``), so the two overlap.

    The DE (``t["de"]``, MEASURED): each rank proposes its ceil(S / N) members' trials before
    it judges; the coordinator packs the population before the exchange and selects after it,
    on the critical path."""
    members = math.ceil(s / n)
    compute = max(args.pass_floor_ms / MS, 2 * members * t["per_cand_s"])
    propose = t["de"]["rank"][(s, members)]
    judge = sync_s(n, t["bytes"], args) + inputs_s(n, s, t, args) + answers_s(n, s, t, args)
    judge += propose + compute
    own = t["de"]["coordinator"][s]
    if pipeline:
        return max(t["train_s"], judge) + control(n) + own
    return t["train_s"] + judge + control(n) + own


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    start_private_instance(num_cpus=4)
    rows = []
    controls: dict[int, dict[str, float]] = {}
    try:
        for n in args.evaluators:
            rows.append(("strong", measure_run(n, args.S, args)))
            rows.append(("weak", measure_run(n, args.S_per_eval * n, args)))
        for n in args.control_evaluators:
            controls[n] = measure_control(n, args)
    finally:
        ray.shutdown()
    lines = [
        f"## Measured: {args.model} {args.input_size} px, energy batch {args.energy_batch}, "
        f"gloo, {args.threads} thread(s) per process, 2 shared CPU cores (medians, ms)",
        "",
        "| mode | N | S | cycle | trainer step | weight sync (bytes) | energy compute max/mean "
        "| control (gather+select+RPC) | of which select | ranks' propose "
        "| batch / population bytes (ms out) "
        "| idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in rows:
        lines.append(
            f"| {mode} | {r['N']} | {r['S']} | {r['cycle_s'] * MS:.0f} | {r['train_s'] * MS:.0f} "
            f"| {r['sync_s'] * MS:.1f} ({r['sync_bytes'] / 1e6:.1f} MB) "
            f"| {r['compute_max_s'] * MS:.0f} / {r['compute_mean_s'] * MS:.0f} "
            f"| {r['control_s'] * MS:.0f} | {r['select_s'] * MS:.1f} "
            f"| {r['rank_propose_s'] * MS:.1f} "
            f"| {r['batch_bytes'] / 1e3:.0f} kB / {r['states_bytes']} B "
            f"({r['inputs_s'] * MS:.1f}) | {100 * r['idle']:.0f} % |"
        )
    gloo = {k: measure_gloo_broadcast(args.target_model, k) for k in (1, 2)}
    lines += ["", f"gloo broadcast of the {args.target_model} {args.target_input} px fp32 buffer "
              "on this machine (MEASURED): "
              + ", ".join(f"{k} receiver(s): {b / 1e6:.1f} MB in {s * MS:.0f} ms "
                          f"({b / s / 1e9:.2f} GB/s)" for k, (b, s) in gloo.items())]  # fmt: skip
    bf = measure_bf16_energies(args)
    lines += ["", f"bf16 weights vs fp32 ({args.model} {args.input_size} px after 20 steps, 16 "
              f"states, MEASURED): mean energy {bf['mean_energy']:.4f}, max |dE| "
              f"{bf['max_abs_diff']:.2e} ({100 * bf['max_rel_diff']:.3f} %), pairwise order "
              f"flips {bf['pair_order_flips']}/{bf['pairs']}, "
              f"same best: {bf['same_best']}"]  # fmt: skip

    weak = {r["N"]: r for mode, r in rows if mode == "weak"}
    ns = sorted(weak)
    heavy = fit_line([float(n) for n in ns], [weak[n]["control_s"] for n in ns])
    cn = [float(n) for n in sorted(controls)]
    c1, slope = fit_line(cn, [controls[n]["wall_s"] for n in sorted(controls)])
    chain = fit_line(cn, [controls[n]["chain_cpu_s"] for n in sorted(controls)])
    busiest = fit_line(cn, [controls[n]["eval_cpu_s"] for n in sorted(controls)])
    lines += [
        "",
        "Control path alone (MEASURED, evaluators that judge next to nothing, medians; wall, "
        "then CPU of the chain driver + coordinator + trainer, then CPU of the busiest "
        "evaluator): "
        + ", ".join(
            f"N = {n}: {c['wall_s'] * MS:.1f} / {c['chain_cpu_s'] * MS:.1f} / "
            f"{c['eval_cpu_s'] * MS:.1f} ms"
            for n, c in sorted(controls.items())
        )
        + f". Fits: wall {c1 * MS:.1f} ms + {slope * MS:.2f} ms per evaluator, chain CPU "
        f"{chain[0] * MS:.1f} ms + {chain[1] * MS:.3f} ms, busiest evaluator CPU "
        f"{busiest[0] * MS:.1f} ms + {busiest[1] * MS:.3f} ms (the compute runs' "
        f"N = {ns[0]}..{ns[-1]} wall fit, contended: {heavy[0] * MS:.1f} ms + "
        f"{heavy[1] * MS:.2f} ms per evaluator)",
    ]
    lines.append(
        "Chain CPU by process, driver / coordinator / trainer (MEASURED, ms per generation): "
        + ", ".join(
            f"N = {n}: {c['driver_cpu_s'] * MS:.1f} / {c['coordinator_cpu_s'] * MS:.1f} / "
            f"{c['trainer_cpu_s'] * MS:.1f}"
            for n, c in sorted(controls.items())
        )
    )
    # "2-core wall": the slope as measured, evaluators queueing for 2 shared cores included;
    # "rank-0 CPU": the same intercept, growing only by the chain's CPU per evaluator (where
    # each evaluator has cores of its own, what rank 0 and the rest of the chain still spend)
    t = target_inputs(args)
    # three rounds, interleaved over N (the machine's drift falls on every N alike), medians
    rounds = [{n: measure_exchange(int(n), t["units"]) for n in cn} for _ in range(3)]
    exchanges = {n: {k: statistics.median(r[n][k] for r in rounds) for k in ("wall_s", "cpu_s")}
                 for n in cn}  # fmt: skip
    exchange = fit_line(cn, [exchanges[n]["cpu_s"] for n in cn])
    # "rank-0 exchange": the same intercept, growing by rank 0's own CPU per rank in the
    # exchange, measured alone with the ranks off its core: the one step of the chain that
    # does work per rank (the driver and the coordinator make one Ray call per generation)
    models = {
        "2-core wall": lambda n: c1 + slope * (n - 1),
        "rank-0 CPU": lambda n: c1 + chain[1] * (n - 1),
        "rank-0 exchange": lambda n: c1 + exchange[1] * (n - 1),
    }
    shapes = [(args.target_S_per_eval * n, args.target_S_per_eval) for n in (1, 8, 64)]
    shapes += [(args.target_S, math.ceil(args.target_S / n)) for n in (1, 8, 64)]
    t["de"] = measure_de(t["units"], shapes, args.seed)
    lines += [
        "",
        f"## Extrapolated: {args.target_model} {args.target_input} px, energy batch "
        f"{args.target_batch}, fp32 weights, trainer on its own GPU",
        "",
        f"- weights per version: {t['bytes'] / 1e6:.1f} MB (MEASURED buffer size); "
        f"MACs per sample {t['macs'] / 1e6:.0f} M (counted)",
        f"- energy compute per candidate {t['per_cand_s'] * MS:.3f} ms, trainer step "
        f"{t['train_s'] * MS:.2f} ms: {t['compute_source']}"
        + (
            f" ({args.gpu_tflops:g} TFLOP/s sustained, floor {args.pass_floor_ms:g} ms per pass)"
            if t["compute_source"].startswith("ASSUMED")
            else ""
        ),
        f"- NCCL broadcast: ASSUMED {args.intra_gbs:g} GB/s in a node of {args.gpus_per_node}, "
        f"{args.inter_gbs:g} GB/s across nodes, {args.latency_us:g} us per tree level",
        f"- the energy batch ({t['batch_bytes'] / 1e6:.2f} MB) and the population, bit-packed: "
        "one broadcast per generation; the answers: one gather, all through rank 0's link; at "
        "the same ASSUMED bandwidth and latency",
        f"- the DE on {t['units']} units per state, MEASURED in process on one thread of this "
        "machine. Each rank proposes its members' trials (unpack the population, propose, pack "
        "the trials), S / members: "
        + ", ".join(f"{k[0]} / {k[1]}: {v * MS:.1f} ms" for k, v in t["de"]["rank"].items())
        + "; the coordinator packs the population and selects, at S = "
        + ", ".join(f"{k}: {v * MS:.1f} ms" for k, v in t["de"]["coordinator"].items())
        + ". The population goes to the ranks by broadcast, as the weights do",
        f"- control, 2-core wall: MEASURED here {c1 * MS:.1f} ms + {slope * MS:.2f} ms per "
        f"evaluator (least squares over N = {', '.join(str(int(n)) for n in cn)} evaluators "
        "judging next to nothing): gloo, Ray and Python on this machine's CPU; NCCL's cost per "
        "message is unmeasured",
        f"- the control path's slope against the CPU it costs: per evaluator "
        f"the chain's CPU grows {chain[1] * MS:.3f} ms (rank 0 sends, receives and unpacks for "
        f"each rank in turn) and the busiest evaluator's {busiest[1] * MS:.3f} ms (MEASURED), "
        f"{(chain[1] + busiest[1]) * MS:.2f} ms in all, against {slope * MS:.2f} ms of wall "
        'time. The "rank-0 CPU" rows ASSUME evaluators on cores of their own: the control '
        f"path then grows by the chain's CPU alone, {c1 * MS:.1f} ms + {chain[1] * MS:.3f} ms "
        "per evaluator",
        "- rank 0's exchange alone (MEASURED, gloo, rank 0 on core 0 and N ranks that answer at "
        "once on the other core; next to nothing on the wire: the cost per message, the bytes "
        "being the bandwidth terms'; medians of 3 rounds; wall / rank 0's CPU per exchange): "
        + ", ".join(
            f"N = {int(n)}: {e['wall_s'] * MS:.2f} / {e['cpu_s'] * MS:.2f} ms"
            for n, e in exchanges.items()
        )
        + f'. Rank 0\'s CPU grows {exchange[1] * MS:.3f} ms per rank. The "rank-0 exchange" '
        "rows ASSUME evaluators on cores of their own and the rest of the chain flat in N (the "
        "driver and the coordinator make one Ray call each per generation, whatever N): the "
        f"control path then grows by that alone, {c1 * MS:.1f} ms + {exchange[1] * MS:.3f} ms "
        "per evaluator. NCCL's cost per rank is unmeasured: its collectives cost rank 0 a "
        "launch each, whatever N, but the headers and flags are one message per rank",
        "",
        "| scaling | S | control | N = 1 cycle | N = 8 cycle | eff. 8 | N = 64 cycle | eff. 64 "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    s, S = args.target_S_per_eval, args.target_S
    for pipeline in (False, True):
        for name, control in models.items():
            w = [cycle_s(n, s * n, t, control, args, pipeline) for n in (1, 8, 64)]
            st = [cycle_s(n, S, t, control, args, pipeline) for n in (1, 8, 64)]
            tag = ", pipeline: true" if pipeline else ""
            lines += [
                f"| weak{tag} | {s} per GPU | {name} | {w[0] * MS:.1f} ms | {w[1] * MS:.1f} ms "
                f"| {w[0] / w[1]:.0%} | {w[2] * MS:.1f} ms | {w[0] / w[2]:.0%} "
                f"| {'' if pipeline else '>= 90 % at 8, >= 80 % at 64'} |",
                f"| strong{tag} | {S} | {name} | {st[0] * MS:.1f} ms | {st[1] * MS:.1f} ms "
                f"| {st[0] / (8 * st[1]):.0%} | {st[2] * MS:.1f} ms | {st[0] / (64 * st[2]):.0%} "
                f"| {'' if pipeline else '>= 60 % at 8'} |",
            ]
    zero = [cycle_s(n, S, t, lambda n: 0.0, args) for n in (1, 8)]
    lines.append(
        f"| strong | {S} | none (the bound) | {zero[0] * MS:.1f} ms | {zero[1] * MS:.1f} ms "
        f"| {zero[0] / (8 * zero[1]):.0%} | | | |"
    )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
