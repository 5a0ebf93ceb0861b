"""What a person sees of a run: the progress line, the summary table, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from .plots import pyplot, save_figure
from .tables import markdown_table

__all__ = [
    "Progress",
    "print_summary",
    "summary_rows",
    "write_plots",
    "summary_markdown",
    "write_kept_per_layer_plot",
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
    plt = pyplot()
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


def summary_markdown(report: dict[str, Any]) -> str:
    """The summary table of :func:`summary_rows` as markdown, under a heading naming the run."""
    title = f"### EDropout: {report['model']} on {report['dataset']} (seed {report.get('seed')})"
    return title + "\n\n" + markdown_table(("", "dense", "pruned"), summary_rows(report))


def write_kept_per_layer_plot(run_dir: Path, kept: dict[str, float]) -> Path:
    """``run_dir/plots/kept_per_layer.png``: a bar of the kept fraction of each coupled group.

    ``kept`` is the report's ``kept_per_layer`` (root layer name -> kept fraction); bars follow its
    order (report.json stores the names sorted: for torchvision names, nearly network order).
    """
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    names = list(kept)
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4))
    ax.bar(range(len(names)), [100 * kept[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("kept units (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out / "kept_per_layer.png")


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
    fig, axes = pyplot().subplots(2, 3, figsize=(12, 6), sharex=True)
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
    return save_figure(fig, path)
