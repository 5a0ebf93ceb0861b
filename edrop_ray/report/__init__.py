"""What a person sees: the progress line, the tables, the markdown files and the plots.

One submodule per thing shown: :mod:`.run` (a run's progress, summary and plots), :mod:`.compare`
(``edrop-ray compare``), :mod:`.sweep` (``edrop-ray sweep`` and its Pareto front), with
:mod:`.plots` (a file-only matplotlib, loaded on first use) and :mod:`.tables` shared by them.
"""

from __future__ import annotations

from .compare import (
    print_table,
    seeds_markdown,
    table_rows,
    to_markdown,
    write_compare_plot,
    write_seeds_plot,
)
from .run import (
    Progress,
    print_summary,
    summary_markdown,
    summary_rows,
    write_dynamics_plot,
    write_kept_per_layer_plot,
    write_plots,
)
from .sweep import (
    pareto_front,
    print_sweep_report,
    sweep_markdown,
    sweep_rows,
    trial_rows,
    trials_markdown,
    write_pareto_plot,
)

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
    "table_rows",
    "print_table",
    "to_markdown",
    "seeds_markdown",
    "write_compare_plot",
    "write_seeds_plot",
    "trial_rows",
    "sweep_markdown",
    "print_sweep_report",
]
