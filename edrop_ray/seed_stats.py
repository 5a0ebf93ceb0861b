"""The summary over seeds of ``edrop-ray compare --seeds``: statistics, no rendering.

Seeds (``--seeds 0,1,2``). Every arm runs once per seed into ``OUT/seed<N>/`` (a complete
single-seed comparison each); ``OUT/compare.json`` and ``compare.md`` hold every seed's rows,
mean and sample standard deviation per arm, and EDropout's lead over each other arm. The lead is
"beyond the spread" when ``|mean(d)| > max(sd(d), sd(EDropout), sd(arm))``, ``d`` being the
per-seed paired differences EDropout - arm; with one seed there is no spread and no verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .config import Config, config_to_dict

__all__ = ["summarize_seeds", "same_config"]


def same_config(stored: dict[str, Any], cfg: Config) -> bool:
    """Whether a stored config is ``cfg``; keys added since it was written count as defaults."""
    defaults = {f.name: f.default for f in fields(Config)}
    return all(stored.get(k, defaults[k]) == v for k, v in config_to_dict(cfg).items())


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_seeds(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every seed's rows, mean and sample std per arm, and EDropout's lead over each arm."""
    first = per_seed[0]
    methods = [r["method"] for r in first["rows"]]
    by = {
        m: [next(r for r in res["rows"] if r["method"] == m) for res in per_seed] for m in methods
    }
    arms = []
    for m in methods:
        rows = by[m]
        top1 = [r["top1"] for r in rows]
        arms.append(
            {
                "method": m,
                "top1_mean": statistics.fmean(top1),
                "top1_sd": _sd(top1),
                "top5_mean": statistics.fmean(r["top5"] for r in rows),
                "params_mean": statistics.fmean(r["params"] for r in rows),
                "prune_rate_mean": statistics.fmean(r["prune_rate"] for r in rows),
                "prune_rate_sd": _sd([r["prune_rate"] for r in rows]),
                "train_steps": [r["train_steps"] for r in rows],
                "top1": top1,
            }
        )
    sd = {a["method"]: a["top1_sd"] for a in arms}
    edrop = [r["top1"] for r in by["edropout"]]
    leads = []
    for m in methods:
        if m == "edropout":
            continue
        diffs = [e - r["top1"] for e, r in zip(edrop, by[m], strict=True)]
        mean, sd_diff = statistics.fmean(diffs), _sd(diffs)
        spread = max(sd_diff, sd["edropout"], sd[m])
        if len(diffs) < 2:
            verdict = "one seed: no spread"
        elif abs(mean) <= spread:
            verdict = "within the spread"
        else:
            verdict = "EDropout ahead" if mean > 0 else "EDropout behind"
        leads.append(
            {
                "method": m,
                "lead_mean": mean,
                "lead_sd": sd_diff,
                "spread": spread,
                "verdict": verdict,
                "diffs": diffs,
            }  # fmt: skip
        )
    return {
        "format": "edrop_ray.compare-seeds/1",
        "dataset": first["dataset"],
        "model": first["model"],
        "backend": first["backend"],
        "budget": first["budget"],
        "seeds": [res["seed"] for res in per_seed],
        "total_steps": first["total_steps"],
        "finetune_steps": [res["finetune_steps"] for res in per_seed],
        "params_dense": first["params_dense"],
        "spread_rule": "|mean(d)| > max(sd(d), sd(EDropout), sd(arm)), d = EDropout - arm per seed",
        "arms": arms,
        "leads": leads,
        "per_seed": [
            {k: res[k] for k in ("seed", "target_params", "finetune_steps", "rows")}
            for res in per_seed
        ],
        "config": {k: v for k, v in first["config"].items() if k != "seed"},
    }
