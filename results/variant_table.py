"""Table of one EDropout variant against the default EDropout and the random-mask control.

    python results/variant_table.py RUNS/digits RUNS/digits-bn energy_bn=batch > results/x.md

RUNS/digits is a ``compare --seeds`` folder (seed<N>/compare.json); RUNS/digits-bn holds one
``edrop-ray prune`` run of the variant per seed (seed<N>/report.json), same config and budget but
the variant's key. The random-mask rows are the comparison's, matched to the *default* EDropout's
parameter count, so the variant's pruning rate is shown beside its Top-1. The spread rule is the
one of compare: |mean(d)| > max(sd(d), sd(a), sd(b)).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _verdict(a: list[float], b: list[float]) -> tuple[float, float, str]:
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, spread = statistics.fmean(d), max(_sd(d), _sd(a), _sd(b))
    if len(d) < 2:
        return mean, spread, "one seed: no spread"
    if abs(mean) <= spread:
        return mean, spread, "within the spread"
    return mean, spread, "ahead" if mean > 0 else "behind"


def main(compare_dir: str, variant_dir: str, label: str) -> str:
    seeds, default, variant, random_mask, rates = [], [], [], [], {"v": [], "d": []}
    for folder in sorted(Path(variant_dir).glob("seed*"), key=lambda p: int(p.name[4:])):
        report_path, cmp_path = folder / "report.json", Path(compare_dir) / folder.name
        if not report_path.is_file() or not (cmp_path / "compare.json").is_file():
            continue  # an unfinished seed is left out, never guessed
        report = json.loads(report_path.read_text())
        rows = {r["method"]: r for r in json.loads((cmp_path / "compare.json").read_text())["rows"]}
        seeds.append(report["seed"])
        variant.append(report["pruned_top1"])
        rates["v"].append(report["prune_rate"])
        default.append(rows["edropout"]["top1"])
        rates["d"].append(rows["edropout"]["prune_rate"])
        random_mask.append(rows["random-mask"]["top1"])
    out = [
        f"| arm (seeds {', '.join(map(str, seeds))}) | Top-1 (%) mean ± std | pruning rate | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "|---|---:|---:|" + "---:|" * len(seeds),
    ]
    for name, top1, rate in (
        ("EDropout (paper: running BN statistics)", default, rates["d"]),
        (f"EDropout, {label}", variant, rates["v"]),
        ("random-mask (default's parameter count)", random_mask, rates["d"]),
    ):
        out.append(
            f"| {name} | {statistics.fmean(top1):.2f} ± {_sd(top1):.2f} | "
            f"{100 * statistics.fmean(rate):.1f}% | " + " | ".join(f"{t:.2f}" for t in top1) + " |"
        )
    out.append("")
    for name, a, b in (("variant - default", variant, default),
                       ("variant - random-mask", variant, random_mask)):  # fmt: skip
        mean, spread, verdict = _verdict(a, b)
        out.append(f"- {name}: {mean:+.2f} points (spread {spread:.2f}): {verdict}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(main(*sys.argv[1:4]), end="")
