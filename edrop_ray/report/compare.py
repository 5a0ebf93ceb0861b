"""What a person sees of ``edrop-ray compare``: the table, ``compare.md`` and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .plots import finish_plot, pyplot

__all__ = [
    "HEADERS",
    "table_rows",
    "print_table",
    "to_markdown",
    "seeds_markdown",
    "write_compare_plot",
    "write_seeds_plot",
]


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """(method, Top-1, Top-5, params, MACs, pruning rate, steps, wall time) as display strings."""
    return [
        (
            r["method"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['params'] / 1e6:.3f} M",
            f"{r['macs'] / 1e6:.2f} M",
            f"{100 * r['prune_rate']:.1f}%",
            str(r["train_steps"]),
            f"{r['wall_s']:.1f}",
        )
        for r in result["rows"]
    ]


HEADERS = (
    "method", "Top-1 (%)", "Top-5 (%)", "params", "MACs", "pruning rate", "steps trained",
    "wall time (s)",
)  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    """The rows of one comparison as a table on the terminal."""
    table = Table(title=f"compare: {result['model']} on {result['dataset']} ({result['budget']})")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(result):
        table.add_row(*row)
    Console().print(table)


_ARM_NOTES = {
    "random-mask": "random-mask trains a random state of EDropout's parameter count from step 0",
    "edropout-s4": "edropout-s4 is EDropout with S = 4",
    "frozen-first-gen": "frozen-first-gen keeps the best state of generation 1",
    "paper-schedule": "paper-schedule evolves at every step with S = 16",
}


def _budget_note(budget: str, total: int, finetune: Any, start: Any, methods) -> str:
    """What the budget meant for the arms that ran (``methods``)."""
    baselines = [m for m in ("magnitude", "random") if m in methods]
    controls = "; ".join(text for m, text in _ARM_NOTES.items() if m in methods)
    controls = f" {controls[0].upper()}{controls[1:]}." if controls else ""
    if budget == "equal-steps":
        pruned = (
            f" {' and '.join(baselines).capitalize().replace('Magnitude', 'Magnitude (group L1)')}"
            f" pruning train{'s' if len(baselines) == 1 else ''} dense to step {start}, "
            f"{'is' if len(baselines) == 1 else 'are'} slimmed to EDropout's parameter count and "
            f"fine-tuned {finetune} steps (the steps EDropout trained its final mask)."
            if baselines
            else ""
        )
        return (
            f"Budget: equal-steps. Every arm trains {total} steps in all.{pruned}{controls} "
            "Steps are counted optimiser steps."
        )
    pruned = (
        f" Magnitude (group L1) and random pruning start from the dense model trained {total} "
        f"steps, are slimmed to EDropout's parameter count and fine-tuned {finetune} steps (the "
        f"steps EDropout trained its final mask, from step {start}): {total} + {finetune} steps "
        "in all."
        if baselines
        else ""
    )
    return (
        f"Budget: equal-finetune. Dense, EDropout and the controls train {total} steps.{pruned}"
        f"{controls} Steps are counted optimiser steps."
    )


def to_markdown(result: dict[str, Any]) -> str:
    """``compare.md`` of one comparison: the table and what the budget means."""
    lines = [
        f"# compare: {result['model']} on {result['dataset']} (seed {result['seed']})",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    note = _budget_note(
        result["budget"], result["total_steps"], result["finetune_steps"],
        result["finetune_start_step"], [r["method"] for r in result["rows"]],
    )  # fmt: skip
    lines += ["", note, ""]
    return "\n".join(lines)


def seeds_markdown(summary: dict[str, Any]) -> str:
    """The summary over seeds: mean ± std per arm, each seed's Top-1, and EDropout's leads."""
    seeds = summary["seeds"]
    head = ["method", "Top-1 (%) mean ± std", "pruning rate", "params", "steps trained"]
    head += [f"seed {s}" for s in seeds]
    lines = [
        f"# compare: {summary['model']} on {summary['dataset']}, seeds "
        f"{', '.join(map(str, seeds))} ({summary['budget']})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for a in summary["arms"]:
        steps = sorted(set(a["train_steps"]))
        cells = [
            a["method"],
            f"{a['top1_mean']:.2f} ± {a['top1_sd']:.2f}",
            f"{100 * a['prune_rate_mean']:.1f}%",
            f"{a['params_mean'] / 1e6:.3f} M",
            "/".join(map(str, steps)),
        ] + [f"{t:.2f}" for t in a["top1"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"EDropout's lead (Top-1 points; beyond the spread when {summary['spread_rule']}):",
        "",
        "| vs | lead mean | sd of paired diffs | spread | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for lead in summary["leads"]:
        lines.append(
            f"| {lead['method']} | {lead['lead_mean']:+.2f} | {lead['lead_sd']:.2f} | "
            f"{lead['spread']:.2f} | {lead['verdict']} |"
        )
    finetune = "/".join(map(str, summary["finetune_steps"]))
    note = _budget_note(summary["budget"], summary["total_steps"], f"{finetune} (per seed)",
                        "T - f", [a["method"] for a in summary["arms"]])  # fmt: skip
    lines += ["", note, ""]
    return "\n".join(lines)


_MARKERS = "o^sDvP*X"  # the baselines sit on EDropout's parameter count: shapes tell them apart


def write_compare_plot(path: Path, result: dict[str, Any]) -> None:
    """Top-1 against parameters of every arm of one comparison, saved at ``path``."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for i, r in enumerate(result["rows"]):
        ax.scatter(r["params"] / 1e6, r["top1"], s=50, marker=_MARKERS[i % len(_MARKERS)],
                   label=r["method"], alpha=0.8)  # fmt: skip
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Top-1 (%)")
    ax.set_title(f"{result['model']} on {result['dataset']} ({result['budget']})")
    finish_plot(fig, ax, path)


def write_seeds_plot(path: Path, summary: dict[str, Any]) -> None:
    """Mean Top-1 (± std over seeds) against mean parameters of every arm, saved at ``path``."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for i, a in enumerate(summary["arms"]):
        ax.errorbar(a["params_mean"] / 1e6, a["top1_mean"], yerr=a["top1_sd"], capsize=4,
                    marker=_MARKERS[i % len(_MARKERS)], linestyle="none", label=a["method"],
                    alpha=0.8)  # fmt: skip
    seeds = ", ".join(map(str, summary["seeds"]))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Top-1 (%), mean ± std")
    ax.set_title(f"{summary['model']} on {summary['dataset']}, seeds {seeds} ({summary['budget']})")
    finish_plot(fig, ax, path)
