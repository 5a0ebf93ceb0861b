"""What every plot shares: a file-only matplotlib, loaded on first use, and an atomic save.

pyplot is imported inside :func:`pyplot`, not at module import, so that importing edrop_ray (the
CLI answering bad input, a Ray actor) never pays for matplotlib; the Agg backend is chosen there,
before pyplot loads: plots are files only, there is no display on clusters and CI.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure", "finish_plot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as a PNG through a temporary file and a rename, then close it."""
    from ..store import write_atomic  # local: store imports torch, the plots do not need it

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        pyplot().close(fig)
    write_atomic(path, buf.getvalue())
    return path


def finish_plot(fig: Any, ax: Any, path: Path) -> Path:
    """A light grid and the legend on ``ax``, then :func:`save_figure`."""
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)
