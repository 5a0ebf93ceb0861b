"""Per-generation time of the Ray backend with and without ``pipeline``, in one run.

One Ray runtime (a private local instance, the default config's actors) alternates blocks of
generations with ``pipeline: false`` and ``pipeline: true`` (ABBA order, so drift cancels) after a
warm-up block. A generation's cycle is the generation plus its ``evolve_every`` training steps;
pipelining overlaps the judging with the first of those steps. Convergence is switched off so
every block evolves. Prints seconds per cycle for both and their ratio; asserts nothing.

    python benchmarks/bench_pipeline.py [--rounds 2] [--generations 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.distributed.runner import RayRuntime
from edrop_ray.learner import Learner
from edrop_ray.loop import run_edropout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: 2 blocks per mode)")
    p.add_argument("--generations", type=int, default=3, help="generations per block")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    # no convergence: every block must evolve for the comparison to mean anything
    cfg = load_config(None, ["backend=ray", "patience=1000000", "diversity_threshold=0",
                             *args.overrides])  # fmt: skip
    train_set, _test, info = load_for(cfg)
    units = Learner(cfg, train_set, info, torch.device("cpu")).units
    t0 = time.perf_counter()
    runtime = RayRuntime(cfg, info, units)
    print(f"config: {cfg.dataset} {cfg.model} {cfg.input_size}px S={cfg.population_size} "
          f"energy_batch={cfg.energy_batch_size} evolve_every={cfg.evolve_every}; "
          f"{runtime.transport_line}; start-up {time.perf_counter() - t0:.1f} s")  # fmt: skip
    learner, search = runtime.learner, runtime.search
    total = learner.total_steps
    per_block = args.generations * cfg.evolve_every
    cycles: dict[bool, list[float]] = {False: [], True: []}

    def block(pipeline: bool, record: bool) -> None:
        learner.cfg = search.cfg = dataclasses.replace(cfg, pipeline=pipeline)
        learner.total_steps = min(learner.step + per_block, total)
        gens: list[dict] = []
        t0 = time.perf_counter()
        run_edropout(learner, search, on_generation=gens.append)
        dt = time.perf_counter() - t0
        if record and gens:
            cycles[pipeline].append(dt / len(gens))
            print(f"  pipeline={str(pipeline).lower():5}  {len(gens)} generations  "
                  f"{dt / len(gens):.3f} s per generation cycle")  # fmt: skip

    try:
        block(False, record=False)  # warm-up: first weights, first broadcast
        order = [False, True, True, False] * args.rounds
        needed = (len(order) + 1) * per_block
        if needed > total:
            raise SystemExit(f"{needed} steps needed, the config has {total}; lower --rounds")
        for pipeline in order:
            block(pipeline, record=True)
    finally:
        runtime.shutdown()
    off, on = statistics.mean(cycles[False]), statistics.mean(cycles[True])
    print(f"per generation cycle: pipeline off {off:.3f} s, on {on:.3f} s, "
          f"on/off {on / off:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
