"""Whole-run cost on the default config (digits, ResNet-18, 32 px), as a user meets it: each run
is a fresh ``edrop-ray prune`` process, timed from outside (imports, Ray start-up and the
artefacts included).

Four kinds of run, interleaved ``--repeats`` times (local, ray, local, ray, ...) so that the
machine's drift hits both backends alike:

- ``cold``: an empty dense cache, so the run trains the dense baseline first (a first run of a
  config); on Ray the actors boot while that baseline trains;
- ``warm``: the dense baseline already cached (a second run of the same config).

Each run's ``report.json`` gives where the time went (``timings``: dense baseline, what was
still waited for the actors, the search, the final measurement). A dense-only run in process fills
the warm cache; EDropout / dense is the local runs' search + final measurement over the cold
local runs' own dense training (same epochs, no masking).

Targets: EDropout / dense <= 2x; Ray / local <= 1.2x end to end. Ratios are taken within one
invocation, from medians; nothing is asserted.

    python benchmarks/bench_run.py [--repeats 2] [--set key=value ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edrop_ray import job
from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.learner import resolve_device


def one_run(backend: str, cache: Path, out: Path, overrides: list[str]) -> dict:
    """``edrop-ray prune`` in a fresh process: its wall seconds and its report."""
    cmd = [sys.executable, "-m", "edrop_ray", "prune", "--quiet", "--out", str(out)]
    cmd += ["--backend", backend] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "EDROP_RAY_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = p.parse_args()
    cfg = load_config(None, [*args.overrides, "backend=local"])
    print(
        f"config: {cfg.dataset} {cfg.model} epochs={cfg.epochs} S={cfg.population_size} "
        f"energy_batch={cfg.energy_batch_size} evolve_every={cfg.evolve_every} "
        f"patience={cfg.patience}; {os.cpu_count()} CPUs"
    )
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDROP_RAY_CACHE"] = str(tmp / "warm")  # this dense run fills the warm cache
        t0 = time.perf_counter()
        dense = job.dense_baseline(cfg, load_for(cfg), resolve_device(cfg.device))
        t_dense = time.perf_counter() - t0
        print(f"dense run in process (train + test): {t_dense:.1f} s, Top-1 {dense['top1']:.2f}")
        for r in range(args.repeats):
            for cache in ("cold", "warm"):
                for backend in ("local", "ray"):
                    where = tmp / "cold" / f"{backend}{r}" if cache == "cold" else tmp / "warm"
                    out = tmp / f"{cache}-{backend}-{r}"
                    run = one_run(backend, where, out, args.overrides)
                    runs.setdefault((cache, backend), []).append(run)
                    t = run["report"].get("timings", {})
                    print(
                        f"  {cache:4s} {backend:5s} #{r}: {run['seconds']:6.1f} s  "
                        + "  ".join(f"{k} {v:.1f}" for k, v in t.items())
                        + f"  Top-1 {run['report']['pruned_top1']:.2f}",
                        flush=True,
                    )
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    print()
    print("| dense cache | local s (median) | Ray s (median) | Ray / local | target |")
    print("|---|---:|---:|---:|---|")
    for cache in ("cold", "warm"):
        lo, ra = med[(cache, "local")], med[(cache, "ray")]
        print(f"| {cache} | {lo:.1f} | {ra:.1f} | {ra / lo:.2f}x | <= 1.2x |")
    # EDropout against the dense baseline trained in the same kind of process (the cold local
    # runs' own dense_s), not against the in-process run above, which pays first-use costs
    local = runs[("cold", "local")] + runs[("warm", "local")]
    search = statistics.median(
        x["report"]["timings"]["search_s"] + x["report"]["timings"]["finish_s"] for x in local
    )
    dense_s = statistics.median(x["report"]["timings"]["dense_s"] for x in runs[("cold", "local")])
    print(
        f"EDropout search + final measurement / dense training (local runs' medians): "
        f"{search:.1f} s / {dense_s:.1f} s = {search / dense_s:.2f}x (<= 2x)"
    )
    if args.out is not None:
        rows = {f"{c}_{b}": [{"seconds": x["seconds"], **x["report"]["timings"]} for x in v]
                for (c, b), v in runs.items()}  # fmt: skip
        args.out.write_text(json.dumps({"dense_s": t_dense, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
