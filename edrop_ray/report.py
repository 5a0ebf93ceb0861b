"""What a person sees: the progress line, the summary table, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.progress import Progress as RichProgress  # noqa: E402
from rich.table import Table  # noqa: E402

__all__ = ["Progress", "print_summary", "summary_rows", "write_plots"]


class Progress:
    """One live line over the training steps, refreshed every generation with the search state.

    When output is not a terminal (CI, ``ray job`` logs), a plain line is printed every
    ``log_every`` generations instead, so logs stay readable.
    """

    def __init__(self, *, total: int, start: int = 0, quiet: bool = False, log_every: int = 10):
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
    return [
        ("Top-1 (%)", f"{report['dense_top1']:.2f}", f"{report['pruned_top1']:.2f}"),
        ("Top-5 (%)", f"{report['dense_top5']:.2f}", f"{report['pruned_top5']:.2f}"),
        ("params", n(report["params_dense"]), n(report["params_pruned"])),
        ("MACs", n(report["macs_dense"]), n(report["macs_pruned"])),
        ("pruning rate", "-", f"{100 * report['prune_rate']:.1f}%"),
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
    """energy.png, diversity.png and kept_fraction.png over generations, in ``run_dir/plots``."""
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    gens = [r["generation"] for r in history]
    panels = {
        "energy": [("best", "best_energy"), ("mean", "mean_energy")],
        "diversity": [("diversity", "diversity")],
        "kept_fraction": [("best state", "kept_fraction")],
    }
    paths = []
    for name, series in panels.items():
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
