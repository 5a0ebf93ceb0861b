"""The control path of two checkouts, interleaved: which one costs less per generation.

Each round runs ``bench_scale.measure_control`` (N evaluators that judge next to nothing; the
driver's generation wall time less the slowest shard's compute) in a fresh process per
checkout, alternating A, B, A, B, so this machine's drift falls on both alike, with the same
model in both (``--model``, default ``tiny_net:build``: next to no compute, so that the shards
of many evaluators queueing for a few cores do not pass for control). It prints, per
checkout, the medians over rounds at each N and the least-squares line a + b (N - 1).

    python benchmarks/bench_control_ab.py --a /path/to/checkout_a --b /path/to/checkout_b
        [--evaluators 1,2,4,8] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import csv, emit

HERE = Path(__file__).resolve().parent

# One checkout's measurement, run with that checkout first on the path.
_CHILD = """
import argparse, json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray, torch
import bench_scale
from edrop_ray.cluster import start_private_instance
torch.set_num_threads(1)
load, model = bench_scale.load_config, sys.argv[3]
bench_scale.load_config = lambda path, over: load(  # the same model in both checkouts
    path, [f"model={model}" if o.startswith("model=") else o for o in over])
args = argparse.Namespace(seed=0)
start_private_instance(num_cpus=4)
try:
    out = {n: bench_scale.measure_control(int(n), args)["wall_s"] for n in sys.argv[2].split(",")}
finally:
    ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def measure(tree: str, ns: list[int], model: str) -> dict[int, float]:
    # the workers inherit the path: the checkout, and benchmarks/ for tiny_net
    path = os.pathsep.join([tree, str(HERE)])
    env = dict(os.environ, PYTHONPATH=path, RAY_AUTH_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, tree, ",".join(map(str, ns)), model],
        env=env, capture_output=True, text=True, timeout=1800, check=True,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return {int(k): v for k, v in json.loads(line[7:]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout A (its root)")
    p.add_argument("--b", required=True, help="checkout B (its root)")
    p.add_argument("--evaluators", type=csv(int), default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--model", default="tiny_net:build", help="the evaluators' model (default: no compute)"
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_scale import fit_line

    runs: dict[str, list[dict[int, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, tree in (("A", args.a), ("B", args.b)):
            runs[name].append(measure(tree, args.evaluators, args.model))
            got = ", ".join(f"N={n} {v * 1e3:.1f} ms" for n, v in runs[name][-1].items())
            print(f"round {r} {name}: {got}", flush=True)
    lines = [
        f"Control path per generation, ms (medians of {args.rounds} interleaved rounds; "
        f"bench_scale.measure_control, model {args.model})",
        "",
        "| checkout | "
        + " | ".join(f"N = {n}" for n in args.evaluators)
        + " | fit a + b (N - 1) |",
        "|---|" + "---:|" * len(args.evaluators) + "---|",
    ]
    for name, tree in (("A", args.a), ("B", args.b)):
        med = {n: statistics.median(run[n] for run in runs[name]) for n in args.evaluators}
        a, b = fit_line([float(n) for n in args.evaluators], list(med.values()))
        cells = " | ".join(f"{med[n] * 1e3:.1f}" for n in args.evaluators)
        lines.append(f"| {name}: {tree} | {cells} | {a * 1e3:.1f} + {b * 1e3:.2f} (N - 1) |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
