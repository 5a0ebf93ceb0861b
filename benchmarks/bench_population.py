"""What a bigger population buys: pruned accuracy and search cost against the population size S.

For every S in ``--sizes`` and every seed in ``--seeds`` it runs one ``python -m edrop_ray prune``
(local backend, one subprocess each, ``--jobs`` at a time) and tabulates per S, mean ± std over
the seeds: pruned Top-1 and Top-5, pruning rate (parameters removed), MACs kept, generations
run, energy evaluations and wall time, with the Top-1 of each seed and the dense Top-1. Every
generation judges 2S candidate states (the S members are re-judged beside the S trials, on the
same batch and weights: edrop_ray.search.Search.propose), and history.parquet has one row per
generation without a count, so the energy evaluations of a run are 2S x its history rows, each
a forward pass of ``energy_batch_size`` images. Under the table one sentence answers "is a
population of 64 worth 8x the energy evaluations of 8?" from the numbers: the Top-1 gap and
whether it exceeds the larger of the two rows' standard deviations. Writes population.json,
population.md and population.png (best energy and diversity per generation, Top-1 against S)
into ``--out``.

The dense baseline is cached per config and seed (EDROP_RAY_CACHE = OUT/cache): the smallest S
of a seed runs first and trains it, the other sizes of that seed start only after it finished,
so no two jobs train (and write) the same cache entry.

    python benchmarks/bench_population.py [--sizes 4,8,16,32,64] [--seeds 0,1,2]
        [--config FILE] [--set key=value ...] [--jobs 1] [--out runs/bench_population]
        [--reuse] [--timeout-s S] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script
from _common import csv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (column, report key, format): the figures of one run that the table averages
COLUMNS = (
    ("Top-1 (%)", "pruned_top1", "{:.2f}"),
    ("Top-5 (%)", "pruned_top5", "{:.2f}"),
    ("pruning rate (%)", "prune_rate_pct", "{:.1f}"),
    ("MACs kept (%)", "macs_kept_pct", "{:.1f}"),
    ("generations", "generations", "{:.1f}"),
    ("energy evaluations", "energy_evals", "{:.0f}"),
    ("wall (s)", "wall_s", "{:.1f}"),
)


def run_dir(out: Path, size: int, seed: int) -> Path:
    return out / f"S{size}" / f"seed{seed}"


def log_path(out: Path, size: int, seed: int) -> Path:
    # beside the run folder, not in it: --overwrite clears the folder
    return out / f"S{size}" / f"seed{seed}.log"


# ---------------------------------------------------------------- summarising (pure, tested)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def read_history(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.is_file() else []


def trained_dense(folder: Path, report: dict[str, Any], cache: Path | None) -> bool:
    """Whether this run trained its seed's dense baseline (its report.json wall_s then includes
    that training): a cache entry with the report's dense wall time was written after the run
    wrote its config.yaml (which prune does before the dense baseline)."""
    started = folder / "config.yaml"
    if cache is None or not cache.is_dir() or not started.is_file():
        return False
    for entry in cache.glob("*.json"):
        try:
            wall = json.loads(entry.read_text()).get("wall_s")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if wall == report.get("dense_wall_s") and entry.stat().st_mtime >= started.stat().st_mtime:
            return True
    return False


def read_run(folder: Path, size: int, cache: Path | None = None) -> dict[str, Any] | None:
    """The figures of one finished run folder (report.json + history.parquet), or None.
    ``cache``: the dense cache's folder (OUT/cache/dense), to take the dense baseline's training
    out of the wall time of the run that trained it."""
    report_path = folder / "report.json"
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    history = read_history(folder / "history.parquet")
    generations = len(history) if history else int(report.get("generations") or 0)
    macs_kept = report.get("macs_kept")
    if macs_kept is None and report.get("macs_dense"):
        macs_kept = report["macs_pruned"] / report["macs_dense"]
    wall = report.get("wall_s")
    dense_here = trained_dense(folder, report, cache)
    if wall is not None and dense_here:
        wall -= float(report["dense_wall_s"])
    return {
        "pruned_top1": float(report["pruned_top1"]),
        "pruned_top5": float(report["pruned_top5"]),
        "dense_top1": float(report["dense_top1"]),
        "prune_rate_pct": 100.0 * float(report["prune_rate"]),
        "macs_kept_pct": None if macs_kept is None else 100.0 * float(macs_kept),
        "generations": int(report.get("generations") or generations),
        "converged": report.get("converged_at") is not None,
        "energy_evals": 2 * size * generations,
        "wall_s": wall,
        "trained_dense": dense_here,
        "best_energy": [r["best_energy"] for r in history],
        "diversity": [r["diversity"] for r in history],
    }


def collect(
    out: Path, sizes: list[int], seeds: list[int], statuses: dict[str, dict] | None = None
) -> tuple[dict[int, dict[int, dict]], list[dict[str, Any]]]:
    """({S: {seed: figures}} of the finished runs, [missing or failed runs with their reason])."""
    statuses = statuses or {}
    runs: dict[int, dict[int, dict]] = {}
    missing = []
    for size in sizes:
        runs[size] = {}
        for seed in seeds:
            status = statuses.get(f"S{size}/seed{seed}", {})
            figures = None
            if status.get("status") not in ("failed", "timeout", "not started"):
                figures = read_run(run_dir(out, size, seed), size, out / "cache" / "dense")
            if figures is None:
                missing.append(
                    {
                        "S": size,
                        "seed": seed,
                        "status": status.get("status", "missing"),
                        "rc": status.get("rc"),
                        "log_tail": status.get("log_tail", ""),
                    }
                )
            else:
                runs[size][seed] = figures
    return runs, missing


def table_rows(runs: dict[int, dict[int, dict]]) -> list[dict[str, Any]]:
    """One row per S: n, mean and sd of every column, Top-1 per seed, dense Top-1 mean."""
    rows = []
    for size, by_seed in sorted(runs.items()):
        row: dict[str, Any] = {"S": size, "n": len(by_seed), "seeds": sorted(by_seed)}
        for _name, key, _fmt in COLUMNS:
            values = [f[key] for f in by_seed.values() if f[key] is not None]
            row[key] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": _sd(values) if values else None,
                "n": len(values),
            }
        row["top1_per_seed"] = {str(s): by_seed[s]["pruned_top1"] for s in sorted(by_seed)}
        dense = [f["dense_top1"] for f in by_seed.values()]
        row["dense_top1_mean"] = statistics.fmean(dense) if dense else None
        row["converged"] = sum(f["converged"] for f in by_seed.values())
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]], big: int = 64, small: int = 8) -> dict[str, Any]:
    """Is a population of ``big`` worth its extra energy evaluations over ``small``? The Top-1
    gap (mean big - mean small) against the spread max(sd big, sd small); no verdict is fixed."""
    by_size = {r["S"]: r for r in rows}
    question = (
        f"Is a population of {big} worth {big // small if big % small == 0 else big / small}x "
        f"the energy evaluations of {small}?"
    )
    if big == small:
        return {
            "question": question,
            "outcome": "unanswered",
            "sentence": "One population size only: nothing to compare.",
        }
    a, b = by_size.get(big), by_size.get(small)
    if a is None or b is None or not a["n"] or not b["n"]:
        return {
            "question": question,
            "outcome": "unanswered",
            "sentence": f"{question} Not answered: S={big} or S={small} has no finished run.",
        }
    ta, tb = a["pruned_top1"], b["pruned_top1"]
    gap = ta["mean"] - tb["mean"]
    spread = max(ta["sd"], tb["sd"])
    ea, eb = a["energy_evals"]["mean"], b["energy_evals"]["mean"]
    ratio = ea / eb if eb else math.inf
    figures = (
        f"S={big} reaches {ta['mean']:.2f} ± {ta['sd']:.2f} % Top-1 against "
        f"{tb['mean']:.2f} ± {tb['sd']:.2f} % for S={small} (gap {gap:+.2f} points, "
        f"n = {a['n']} and {b['n']} seeds) for {ratio:.1f}x the energy evaluations "
        f"({ea:.0f} vs {eb:.0f})"
    )
    if min(a["n"], b["n"]) < 2:
        outcome = "no spread"
        tail = "one seed on a side gives no spread, so this does not answer it."
    elif abs(gap) > spread:
        outcome = "better" if gap > 0 else "worse"
        tail = (
            f"the gap exceeds the seed spread (max sd {spread:.2f}), so the bigger population "
            + ("buys accuracy at that price." if gap > 0 else "is measurably worse.")
        )
    else:
        outcome = "within spread"
        tail = (
            f"the gap does not exceed the seed spread (max sd {spread:.2f}), so these seeds "
            "show no accuracy bought by the extra evaluations."
        )
    return {
        "question": question,
        "outcome": outcome,
        "gap": gap,
        "spread": spread,
        "evals_ratio": ratio,
        "sentence": f"{question} {figures}; {tail}",
    }


def _cell(stat: dict[str, Any], fmt: str) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['sd'])}"


def markdown(
    rows: list[dict[str, Any]],
    seeds: list[int],
    verdict_: dict[str, Any],
    missing: list[dict[str, Any]],
    header: str = "",
) -> str:
    lines = ["# What a bigger population buys", ""]
    if header:
        lines += [header, ""]
    lines.append(
        "| S | runs | "
        + " | ".join(name for name, _k, _f in COLUMNS)
        + " | "
        + " | ".join(f"Top-1 seed {s}" for s in seeds)
        + " | converged | dense Top-1 (%) |"
    )
    lines.append("|---:|---:|" + "---:|" * (len(COLUMNS) + len(seeds) + 2))
    for r in rows:
        per_seed = [
            f"{r['top1_per_seed'][str(s)]:.2f}" if str(s) in r["top1_per_seed"] else "-"
            for s in seeds
        ]
        dense = "-" if r["dense_top1_mean"] is None else f"{r['dense_top1_mean']:.2f}"
        lines.append(
            f"| {r['S']} | {r['n']}/{len(seeds)} | "
            + " | ".join(_cell(r[k], f) for _n, k, f in COLUMNS)
            + " | "
            + " | ".join(per_seed)
            + f" | {r['converged']}/{r['n']} | {dense} |"
        )
    lines += [
        "",
        verdict_["sentence"],
        "",
        "Mean ± sample std over the finished seeds of each row. Energy evaluations: 2S candidate "
        "states per generation (members re-judged beside their trials) x the generations in "
        "history.parquet, which records no count of its own; each is one forward pass of "
        "energy_batch_size images. Pruning rate: parameters removed; generations: until the "
        "search froze (converged) or the training budget ended; wall: the pruning run's own "
        "time (report.json wall_s, less the dense baseline's training in the run of each seed that "
        "trained it into the cache).",
    ]
    if missing:
        lines += ["", f"Left out of the means (runs: {len(missing)}):", ""]
        for m in missing:
            tail = " ".join(m["log_tail"].split())[-300:]
            rc = "" if m["rc"] is None else f", exit {m['rc']}"
            lines.append(f"- S={m['S']} seed {m['seed']}: {m['status']}{rc}" + (
                f": `{tail}`" if tail else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def summarise(
    out: Path,
    sizes: list[int],
    seeds: list[int],
    statuses: dict[str, dict] | None = None,
    header: str = "",
    plot: bool = True,
) -> dict[str, Any]:
    """Read the run folders under ``out``; write population.json / .md (and .png)."""
    runs, missing = collect(out, sizes, seeds, statuses)
    rows = table_rows(runs)
    big, small = (64, 8) if {64, 8} <= set(sizes) else (max(sizes), min(sizes))
    v = verdict(rows, big, small)
    summary = {"sizes": sizes, "seeds": seeds, "rows": rows, "verdict": v, "missing": missing}
    out.mkdir(parents=True, exist_ok=True)
    (out / "population.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "population.md").write_text(markdown(rows, seeds, v, missing, header))
    if plot:
        write_plot(out / "population.png", runs, rows)
    return summary


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Average by generation index over curves of different lengths (what exists at each)."""
    length = max((len(c) for c in curves), default=0)
    return [statistics.fmean([c[g] for c in curves if len(c) > g]) for g in range(length)]


def write_plot(path: Path, runs: dict[int, dict[int, dict]], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for size, by_seed in sorted(runs.items()):
        for ax, key in zip(axes[:2], ("best_energy", "diversity"), strict=True):
            curve = mean_curve([f[key] for f in by_seed.values() if f[key]])
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, label=f"S={size}", lw=1.2)
    for ax, title in zip(axes[:2], ("best energy", "diversity"), strict=True):
        ax.set_title(f"{title} per generation (mean over seeds)", fontsize=10)
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    done = [r for r in rows if r["n"]]
    axes[2].errorbar(
        [r["S"] for r in done],
        [r["pruned_top1"]["mean"] for r in done],
        yerr=[r["pruned_top1"]["sd"] for r in done],
        marker="o",
        capsize=4,
    )
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks([r["S"] for r in rows], [str(r["S"]) for r in rows])
    axes[2].minorticks_off()
    axes[2].set_xlabel("population size S")
    axes[2].set_ylabel("pruned Top-1 (%)")
    axes[2].set_title("pruned Top-1 vs S (mean ± std over seeds)", fontsize=10)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- running the sweep


def command(args: argparse.Namespace, size: int, seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "edrop_ray", "prune"]
    if args.config:  # the runs start in the repository root: absolute paths
        cmd += ["--config", str(Path(args.config).resolve())]
    cmd += ["--set", f"population_size={size}", "--set", f"seed={seed}"]
    for override in args.overrides:
        cmd += ["--set", override]
    out = run_dir(Path(args.out).resolve(), size, seed)
    return cmd + ["--set", "backend=local", "--out", str(out), "--quiet", "--overwrite"]


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    """End a run's own process group (it was started in a new session), by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def sweep(args: argparse.Namespace) -> dict[str, dict]:
    """Run every (S, seed); the smallest S of a seed first (it trains the seed's dense baseline
    into the cache), the others of that seed only once it has finished. Returns the statuses."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDROP_RAY_CACHE=str((out / "cache").resolve()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    statuses: dict[str, dict] = {}
    first = min(args.sizes)
    pending = [(s, k) for k in args.seeds for s in sorted(args.sizes)]
    pending.sort(key=lambda p: p[0] != first)  # every seed's first run ahead of the rest
    running: dict[tuple[int, int], tuple[subprocess.Popen, float, Any]] = {}
    deadline = time.monotonic() + args.timeout_s if args.timeout_s else math.inf

    def done(size: int, seed: int, status: str, rc: int | None, wall: float) -> None:
        log = log_path(out, size, seed)
        statuses[f"S{size}/seed{seed}"] = {
            "status": status, "rc": rc, "wall_s": wall,
            "log_tail": "" if status == "ok" else _tail(log),
        }  # fmt: skip
        print(f"S={size} seed {seed}: {status}" + (f" (exit {rc})" if rc else "")
              + f", {wall:.0f} s", flush=True)  # fmt: skip

    for size, seed in list(pending):
        if args.reuse and (run_dir(out, size, seed) / "report.json").is_file():
            pending.remove((size, seed))
            statuses[f"S{size}/seed{seed}"] = {"status": "reused", "rc": 0, "log_tail": ""}
    try:
        while pending or running:
            if time.monotonic() > deadline:
                break
            for key in list(pending):
                size, seed = key
                if len(running) >= args.jobs:
                    break
                if size != first and f"S{first}/seed{seed}" not in statuses:
                    continue  # the seed's dense baseline is not cached yet
                pending.remove(key)
                log = log_path(out, size, seed)
                log.parent.mkdir(parents=True, exist_ok=True)
                fh = log.open("w")
                proc = subprocess.Popen(command(args, size, seed), stdout=fh,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        start_new_session=True)  # fmt: skip
                running[key] = (proc, time.monotonic(), fh)
            for key, (proc, t0, fh) in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    fh.close()
                    del running[key]
                    done(*key, "ok" if rc == 0 else "failed", rc, time.monotonic() - t0)
            time.sleep(0.5)
    finally:  # past the deadline or interrupted: end what still runs, report it
        for key, (proc, t0, fh) in running.items():
            _kill(proc)
            fh.close()
            done(*key, "timeout", None, time.monotonic() - t0)
        for size, seed in pending:
            statuses[f"S{size}/seed{seed}"] = {"status": "not started", "rc": None,
                                               "log_tail": ""}  # fmt: skip
        (out / "runs.json").write_text(json.dumps(statuses, indent=2) + "\n")
    return statuses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=csv(int), default=[4, 8, 16, 32, 64], help="population sizes")
    p.add_argument("--seeds", type=csv(int), default=[0, 1, 2])
    p.add_argument("--config", help="YAML config (default: the built-in digits + ResNet-18)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--out", default="runs/bench_population")
    p.add_argument("--reuse", action="store_true", help="keep runs whose report.json exists")
    p.add_argument("--timeout-s", type=float, default=0, help="for the whole sweep (0: none)")
    p.add_argument("--summary-only", action="store_true", help="only summarise --out")
    args = p.parse_args()
    out = Path(args.out)
    statuses = None
    if args.summary_only:
        if (out / "runs.json").is_file():
            statuses = json.loads((out / "runs.json").read_text())
    else:
        t0 = time.perf_counter()
        statuses = sweep(args)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    header = (
        f"config: {args.config or 'built-in default (digits + ResNet-18)'}; "
        f"--set {' '.join(args.overrides) or '(none)'}; backend local"
    )
    summary = summarise(out, args.sizes, args.seeds, statuses, header)
    print((out / "population.md").read_text(), end="")
    print(f"wrote {out / 'population.json'}, {out / 'population.md'}, {out / 'population.png'}")
    if summary["missing"]:
        print(f"{len(summary['missing'])} runs missing or failed", file=sys.stderr)


if __name__ == "__main__":
    main()
