"""What a person sees: the progress line, the summary table, the plots."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.progress import Progress as RichProgress  # noqa: E402
from rich.table import Table  # noqa: E402

__all__ = [
    "Progress",
    "print_summary",
    "summary_rows",
    "write_plots",
    "summary_markdown",
    "write_kept_per_layer_plot",
    "pareto_front",
    "sweep_rows",
    "trials_markdown",
    "write_pareto_plot",
    "write_dynamics_plot",
]


class Progress:
    """One live line over the training steps, refreshed every generation with the search state.

    When output is not a terminal (CI, ``ray job`` logs), a plain line is printed every
    ``log_every`` generations instead (default: each), since a live bar cannot redraw there.
    """

    def __init__(self, *, total: int, start: int = 0, quiet: bool = False, log_every: int = 1):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.log_every = log_every
        self.live = self.console.is_terminal and not quiet
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.live,
        )
        self._task = self._bar.add_task("edropout", total=total, completed=start)

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def generation(self, record: dict[str, Any], step: int, extra: str = "") -> None:
        line = (
            f"gen {record['generation']:4d}  energy {record['best_energy']:.4f}  "
            f"kept {100 * record['kept_fraction']:5.1f}%  div {record['diversity']:.3f}"
            + (f"  evaluators {record['evaluators']}" if "evaluators" in record else "")
            + ("  frozen" if record["frozen"] else "")
            + extra
        )
        if self.live:
            self._bar.update(self._task, completed=step, description=line)
        elif not self.quiet and (record["generation"] % self.log_every == 0 or record["frozen"]):
            self.console.print(line, highlight=False)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, dense, pruned) rows of the summary table."""

    def n(v: int) -> str:
        return f"{v / 1e6:.2f} M"

    conv = report.get("converged_at")
    budgets = [  # the budget asked for next to the one reached on the slimmed model
        (f"{what} kept (budget)", "-", f"{100 * report[kept]:.1f}% (<= {100 * target:.1f}%)")
        for what, kept, target in (
            ("params", "params_kept", report.get("target_params")),
            ("MACs", "macs_kept", report.get("target_macs")),
        )
        if target is not None
    ]
    return [
        ("Top-1 (%)", f"{report['dense_top1']:.2f}", f"{report['pruned_top1']:.2f}"),
        ("Top-5 (%)", f"{report['dense_top5']:.2f}", f"{report['pruned_top5']:.2f}"),
        ("params", n(report["params_dense"]), n(report["params_pruned"])),
        ("MACs", n(report["macs_dense"]), n(report["macs_pruned"])),
        ("pruning rate", "-", f"{100 * report['prune_rate']:.1f}%"),
        *budgets,
        ("generations", "-", f"{report['generations']} (converged at {conv})"),
        ("wall time (s)", f"{report.get('dense_wall_s') or 0:.1f}", f"{report['wall_s']:.1f}"),
    ]


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"EDropout: {report['model']} on {report['dataset']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    Console().print(table)


def write_plots(run_dir: Path, history: list[dict[str, Any]]) -> list[Path]:
    """energy.png, diversity.png and kept_fraction.png over generations, in ``run_dir/plots``;
    with the dynamics columns (runs from this version on) also best_changed_bits.png (bits of the
    best state that changed), energy_gap.png (median member minus best, same weights and batch)
    and train_loss.png."""
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    gens = [r["generation"] for r in history]
    panels = {
        "energy": [("best", "best_energy"), ("mean", "mean_energy")],
        "diversity": [("diversity", "diversity")],
        "kept_fraction": [("best state", "kept_fraction")],
        "best_changed_bits": [("bits of the best state changed", "best_changed_bits")],
        "energy_gap": [("median - best energy", "energy_gap")],
        "train_loss": [("training loss", "train_loss")],
    }
    paths = []
    for name, series in panels.items():
        if history and any(key not in history[0] for _, key in series):
            continue  # a run written before the column existed
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, key in series:
            ax.plot(gens, [r[key] for r in history], label=label)
        ax.set_xlabel("generation")
        ax.set_ylabel(name.replace("_", " "))
        if len(series) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG through a temporary file and a rename, then close it."""
    from .files import write_atomic  # local: files imports torch, the plots above do not need it

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A GitHub markdown table; columns from index ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(report: dict[str, Any]) -> str:
    """The summary table of :func:`summary_rows` as markdown, under a heading naming the run."""
    title = f"### EDropout: {report['model']} on {report['dataset']} (seed {report.get('seed')})"
    return title + "\n\n" + _markdown_table(("", "dense", "pruned"), summary_rows(report))


def write_kept_per_layer_plot(run_dir: Path, kept: dict[str, float]) -> Path:
    """``run_dir/plots/kept_per_layer.png``: a bar of the kept fraction of each coupled group.

    ``kept`` is the report's ``kept_per_layer`` (root layer name -> kept fraction); bars follow its
    order (report.json stores the names sorted: for torchvision names, nearly network order).
    """
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    names = list(kept)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4))
    ax.bar(range(len(names)), [100 * kept[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("kept units (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, out / "kept_per_layer.png")


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
    return "### EDropout sweep\n\n" + _markdown_table(header, table, right=3)


def write_pareto_plot(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Top-1 against pruning rate of every trial, the Pareto front highlighted, saved at ``path``.

    Trials without a Top-1 or pruning rate (failed ones) are left out.
    """
    rate = [100 * _number(r.get("prune_rate")) for r in rows]
    top1 = [_number(r.get("top1")) for r in rows]
    front = pareto_front(list(zip(rate, top1, strict=True)))
    shown = [i for i in range(len(rows)) if not (math.isnan(rate[i]) or math.isnan(top1[i]))]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return _save_figure(fig, Path(path))


_DYNAMICS = (
    ("best_changed_bits", "bits of the best state changed"),
    ("energy_gap", "median - best energy"),
    ("best_energy", "best energy"),
    ("train_loss", "training loss"),
    ("diversity", "diversity"),
    ("kept_fraction", "kept fraction (best)"),
)


def write_dynamics_plot(path: Path, histories: dict[str, list[dict[str, Any]]]) -> Path:
    """One panel per search dynamic of :func:`write_plots` over the training step, one line per
    run (e.g. per seed): ``histories`` maps a label to a run's history rows."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, _DYNAMICS, strict=True):
        for label, rows in histories.items():
            rows = [r for r in rows if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label, lw=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=8)  # the last panel carries the legend
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    axes.flat[1].set_yscale("symlog")  # energy gaps span orders of magnitude
    axes.flat[2].set_yscale("log")
    return _save_figure(fig, path)
