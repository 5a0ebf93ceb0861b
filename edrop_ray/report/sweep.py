"""What a person sees of a sweep: the trial rows, their Pareto front, the table and the plot.

``edrop-ray sweep`` writes ``sweep.json`` (the rows of :func:`trial_rows`) and ``sweep.md``
(:func:`sweep_markdown`); ``edrop-ray report SWEEP_DIR`` reads ``sweep.json`` back
(:func:`print_sweep_report`) with the same table and adds ``pareto.png``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..space import plain
from .plots import pyplot, save_figure
from .tables import markdown_table

__all__ = [
    "pareto_front",
    "trial_rows",
    "sweep_rows",
    "trials_markdown",
    "sweep_markdown",
    "write_pareto_plot",
    "print_sweep_report",
]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates, maximising both values.

    A point dominates another when it is at least as high in both coordinates and higher in one.
    Equal points do not dominate each other, so duplicates on the front are all kept. A point with
    a NaN coordinate is never on the front and never dominates.
    """
    valid = [
        (i, float(a), float(b))
        for i, (a, b) in enumerate(points)
        if not (math.isnan(float(a)) or math.isnan(float(b)))
    ]
    front = []
    for i, a, b in valid:
        dominated = any(
            (a2 >= a and b2 >= b) and (a2 > a or b2 > b) for j, a2, b2 in valid if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _number(value: Any) -> float:
    """A row's metric as a float; NaN when it is missing (a failed or unfinished trial)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def sweep_rows(sweep: Any) -> list[dict[str, Any]]:
    """The trial rows of a ``sweep.json``: either a list of rows or ``{"trials": [...]}``."""
    rows = sweep.get("trials", sweep.get("rows")) if isinstance(sweep, dict) else sweep
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("sweep.json must hold a list of trial rows or {'trials': [...]}")
    return rows


def _format_params(params: Any) -> str:
    if not isinstance(params, dict):
        return "-" if params is None else str(params)
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items())


def trials_markdown(rows: Sequence[dict[str, Any]], front: Sequence[int]) -> str:
    """The trials of a sweep as a markdown table, in the order given; ``#`` is the row's index
    (the label in ``pareto.png``) and Pareto-optimal trials are marked with ``*``."""

    def pct(v: Any, scale: float = 1.0) -> str:
        x = _number(v)
        return "-" if math.isnan(x) else f"{scale * x:.2f}"

    def mega(v: Any) -> str:
        x = _number(v)
        return "-" if math.isnan(x) else f"{x / 1e6:.2f} M"

    on_front = set(front)
    table = [
        (
            str(i),
            str(r.get("trial_id") or "-"),
            _format_params(r.get("params")),
            pct(r.get("top1")),
            pct(r.get("top5")),
            pct(r.get("prune_rate"), 100.0),
            mega(r.get("params_pruned")),
            str(r.get("status") or "-"),
            "*" if i in on_front else "",
        )
        for i, r in enumerate(rows)
    ]
    header = (
        "#", "trial", "hyper-parameters", "Top-1 (%)", "Top-5 (%)", "pruning rate (%)",
        "params left", "status", "Pareto",
    )  # fmt: skip
    return "### EDropout sweep\n\n" + markdown_table(header, table, right=3)


def write_pareto_plot(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Top-1 against pruning rate of every trial, the Pareto front highlighted, saved at ``path``.

    Trials without a Top-1 or pruning rate (failed ones) are left out.
    """
    rate = [100 * _number(r.get("prune_rate")) for r in rows]
    top1 = [_number(r.get("top1")) for r in rows]
    front = pareto_front(list(zip(rate, top1, strict=True)))
    shown = [i for i in range(len(rows)) if not (math.isnan(rate[i]) or math.isnan(top1[i]))]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.scatter([rate[i] for i in shown], [top1[i] for i in shown], color="0.6", label="trials")
    ordered = sorted(front, key=lambda i: rate[i])
    ax.plot(
        [rate[i] for i in ordered],
        [top1[i] for i in ordered],
        color="tab:red",
        marker="o",
        label="Pareto front",
    )
    for i in ordered:
        ax.annotate(str(i), (rate[i], top1[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("pruning rate (% of parameters removed)")
    ax.set_ylabel("Top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(path))


def trial_rows(results: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid`` (the rows of ``sweep.json``), best Top-1 first:
    the searched ``keys``, status (finished, error, stopped by ASHA, unfinished), metrics, and
    ``pareto``: whether the trial is on the Pareto front of (Top-1, prune rate) among the
    finished ones."""
    # Tune's Trial objects (status, and the config of trials that never started) sit behind the
    # ResultGrid, in the same order as its results; without them, status comes from metrics.
    analysis = getattr(results, "_experiment_analysis", None)
    trials = list(getattr(analysis, "trials", None) or [])
    if len(trials) != len(results):
        trials = [None] * len(results)
    rows = []
    for r, trial in zip(results, trials, strict=True):
        m = dict(r.metrics or {})
        config = r.config or getattr(trial, "config", None) or {}
        tune_status = getattr(trial, "status", None)
        if "top1" in m:
            status = "finished"
        elif r.error is not None:
            status = "error"
        elif tune_status in (None, "TERMINATED"):
            status = "stopped"  # early-stopped by ASHA
        else:
            status = "unfinished"  # interrupted: run the same sweep again to resume it
        error = None
        if r.error is not None:
            lines = [ln for ln in str(r.error).strip().splitlines() if ln.strip()]
            error = lines[-1][:300] if lines else type(r.error).__name__
        rows.append({
            "trial_id": m.get("trial_id", getattr(trial, "trial_id", None)),
            "params": {k: plain(config.get(k)) for k in keys},
            "status": status,
            "error": error,
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "prune_rate": m.get("prune_rate"),
            "params_pruned": m.get("params_pruned"),
            "params_dense": m.get("params_dense"),
            "macs_pruned": m.get("macs_pruned"),
            "kept_fraction": m.get("kept_fraction"),
            "best_energy": m.get("best_energy"),
            "generation": m.get("generation"),
            "step": m.get("step"),
            "path": r.path,
        })  # fmt: skip
    points = [
        (_number(r["top1"]), _number(r["prune_rate"])) if r["status"] == "finished"
        else (math.nan, math.nan)
        for r in rows
    ]  # fmt: skip
    front = set(pareto_front(points))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    rows.sort(key=lambda r: (r["top1"] is None, -(r["top1"] or 0.0), -(r["prune_rate"] or 0.0)))
    return rows


def sweep_markdown(rows: Sequence[dict[str, Any]], note: str = "") -> str:
    """The ``sweep.md`` table of :func:`trial_rows`' rows (:func:`trials_markdown`, the front
    from their ``pareto`` flags), then ``note``."""
    front = [i for i, r in enumerate(rows) if r.get("pareto")]
    return trials_markdown(rows, front) + "\n" + (f"\n{note}\n" if note else "")


def print_sweep_report(sweep_dir: Path, fmt: str) -> int:
    """``edrop-ray report SWEEP_DIR``: the trials of ``sweep.json`` on stdout (``fmt``: md | json)
    and ``SWEEP_DIR/pareto.png``."""
    path = sweep_dir / "sweep.json"
    try:
        rows = sweep_rows(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{str(path)!r} is not a sweep table ({e}); re-run the sweep") from e
    points = [(_number(r.get("top1")), _number(r.get("prune_rate"))) for r in rows]
    front = pareto_front(points)
    plot = write_pareto_plot(sweep_dir / "pareto.png", rows)
    if fmt == "json":
        blob = {"kind": "sweep", "path": str(sweep_dir), "trials": rows, "pareto": front,
                "plots": [str(plot)]}  # fmt: skip
        print(json.dumps(blob, indent=2, sort_keys=True, default=str))
    else:
        print(trials_markdown(rows, front))
    print(f"plot: {plot}", file=sys.stderr)
    return 0
