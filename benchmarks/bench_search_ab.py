"""The search phase on the Ray backend against the local one, in one driver, interleaved.

One driver holds both: a local learner and search (the local backend) and a Ray runtime (a
private local instance, the default config's actors). Blocks of ``--generations`` generations
alternate between them (a warm-up block each, then ABBA order, so the machine's drift falls on
both alike); while one side runs, the other's processes sleep. Convergence is switched off so
every block evolves. Per block it prints the seconds per generation cycle (the generation and
its ``evolve_every`` training steps), the generation alone, a training step as the driver sees
it and, on Ray, as the trainer actor times it itself (no round trip), and the cores each
process used (CPU seconds from /proc over the block's wall time, by the pids the actors
report; Ray's other processes as the driver's descendants, no process found by name).
Asserts nothing.

    python benchmarks/bench_search_ab.py [--rounds 2] [--generations 4] [--set key=value ...]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch
from _common import cpu_seconds, descendants, emit

from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.distributed.runner import RayRuntime
from edrop_ray.learner import Learner
from edrop_ray.loop import run_edropout
from edrop_ray.search import Search


def _cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` still running."""
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended (an idle worker Ray let go)
    return out


def _pid(_actor) -> int:  # run inside an actor (pickled by value)
    return os.getpid()


def _time_steps(actor) -> int:
    """Inside the trainer actor: time each training step where it runs."""
    actor._step_s = []
    inner = actor.learner.train

    def timed(state):
        t = time.perf_counter()
        out = inner(state)
        actor._step_s.append(time.perf_counter() - t)
        return out

    actor.learner.train = timed
    return os.getpid()


def _take_steps(actor) -> list[float]:
    out, actor._step_s = actor._step_s, []
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds")
    p.add_argument("--generations", type=int, default=4, help="generations per block")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="")
    args = p.parse_args()
    cfg = load_config(None, ["backend=ray", "patience=1000000", "diversity_threshold=0",
                             *args.overrides])  # fmt: skip
    if cfg.cpu_threads:  # as a local run sets it (edrop_ray.run.execute)
        torch.set_num_threads(cfg.cpu_threads)
    train_set, _test, info = load_for(cfg)
    local = Learner(cfg, train_set, info, torch.device("cpu"))
    sides = {"local": (local, Search.from_config(cfg, local.units.num_units))}
    runtime = RayRuntime(cfg, info, local.units, train_set=train_set)
    sides["ray"] = (runtime.learner, runtime.search)
    per_block = args.generations * cfg.evolve_every
    order = ["ray", "local"] + ["ray", "local", "local", "ray"] * args.rounds
    if (order.count("ray") * per_block) > local.total_steps:
        raise SystemExit(f"{order.count('ray') * per_block} steps needed per side, the config "
                         f"has {local.total_steps}; lower --rounds or --generations")  # fmt: skip
    lines, rows = [], {"local": [], "ray": []}
    try:
        trainer_pid = ray.get(runtime.trainer.__ray_call__.remote(_time_steps), timeout=120)
        pids = {"driver": os.getpid(), "trainer": trainer_pid}
        pids["coordinator"] = ray.get(runtime.coordinator.__ray_call__.remote(_pid), timeout=60)
        for k, e in enumerate(runtime.evaluators):
            pids[f"evaluator {k}"] = ray.get(e.__ray_call__.remote(_pid), timeout=60)
        # Ray's own processes: what this driver started (the local instance's daemons and
        # idle workers), less the actors measured by their own pids; no process found by name
        daemons = [d for d in descendants(os.getpid()) if d not in pids.values()]
        for i, side in enumerate(order):
            learner, search = sides[side]
            learner.total_steps = learner.step + per_block
            steps: list[float] = []
            inner = learner.train

            def timed(state, inner=inner, steps=steps):
                t = time.perf_counter()
                out = inner(state)
                steps.append(time.perf_counter() - t)
                return out

            learner.train = timed
            gens: list[dict] = []
            c0 = {k: cpu_seconds(v) for k, v in pids.items()}
            d0 = _cpu_of(daemons)
            t0 = time.perf_counter()
            run_edropout(learner, search, on_generation=gens.append)
            wall = time.perf_counter() - t0
            cores = {k: (cpu_seconds(v) - c0[k]) / wall for k, v in pids.items()}
            cores["Ray's other processes"] = (
                sum(v - d0[k] for k, v in _cpu_of(daemons).items() if k in d0) / wall
            )
            del learner.train
            inside = ray.get(runtime.trainer.__ray_call__.remote(_take_steps), timeout=60)
            row = {
                "cycle_s": wall / len(gens),
                "generation_s": statistics.median(g["energy_seconds"] for g in gens),
                "step_s": statistics.median(steps),
                "inside_s": statistics.median(inside) if side == "ray" else float("nan"),
            }
            if i >= 2:  # after each side's warm-up block
                rows[side].append(row)
            lines.append(
                f"{side:5s} {'(warm-up) ' if i < 2 else ''}cycle {row['cycle_s']:.3f} s, "
                f"generation {row['generation_s']:.3f} s, step {row['step_s']:.3f} s"
                + (f" (inside the trainer {row['inside_s']:.3f} s)" if side == "ray" else "")
                + "; cores: "
                + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            )
            print(lines[-1], flush=True)
    finally:
        runtime.shutdown()
    lines.append("")
    lines.append("| per block, median over blocks | Ray | local | Ray / local |")
    lines.append("|---|---:|---:|---:|")
    for key, name in [("cycle_s", "generation cycle"), ("generation_s", "generation"),
                      ("step_s", "training step (driver's view)")]:  # fmt: skip
        r = statistics.median(x[key] for x in rows["ray"])
        lo = statistics.median(x[key] for x in rows["local"])
        lines.append(f"| {name} | {r:.3f} s | {lo:.3f} s | {r / lo:.3f}x |")
    emit(
        f"config: {cfg.dataset} {cfg.model} S={cfg.population_size} evolve_every="
        f"{cfg.evolve_every}; {runtime.transport_line}; {args.generations} generations per "
        f"block, {args.rounds} ABBA rounds, {os.cpu_count()} CPUs\n" + "\n".join(lines),
        args.out,
    )


if __name__ == "__main__":
    main()
