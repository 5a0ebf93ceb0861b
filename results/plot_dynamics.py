"""Search dynamics over seeds: ``python results/plot_dynamics.py results/digits``.

Reads ``seed<N>/history.parquet`` (copied from each seed's EDropout run by run_compare.sh) and
writes ``dynamics.png`` beside them (edrop_ray.report.write_dynamics_plot), and prints, per seed,
the generation after which the best state never changed again and the energy gap then.

Runs with ``probe_members`` (fixed random states judged at every generation on the same weights
and batch) also get ``probe.png``: per seed, the best state's energy, the median member's and the
fixed random states' mean, and the printed probe gap (probe - best) early and late.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

from edrop_ray.report import write_dynamics_plot


def main(folder: str) -> None:
    root = Path(folder)
    histories = {}
    for path in sorted(root.glob("seed*/history.parquet")):
        rows = pq.read_table(path).to_pylist()
        histories[path.parent.name] = rows
        last_change = max((r["generation"] for r in rows if r["best_changed_bits"]), default=0)
        gaps = [r["energy_gap"] for r in rows]
        print(
            f"{path.parent.name}: {len(rows)} generations, best state last changed at generation "
            f"{last_change}, bits changed in all {sum(r['best_changed_bits'] for r in rows)}, "
            f"energy gap median-best: first {gaps[0]:.3f}, max {max(gaps):.3f}, "
            f"last {gaps[-1]:.3f}; best energy max {max(r['best_energy'] for r in rows):.2f}"
        )
    write_dynamics_plot(root / "dynamics.png", histories)
    probed = {k: rows for k, rows in histories.items() if rows and "probe_energy" in rows[0]}
    if probed:
        write_probe_plot(root / "probe.png", probed)


def write_probe_plot(path: Path, histories: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], histories.items(), strict=True):
        g = [r["generation"] for r in rows]
        for key, label in (("best_energy", "best state"), ("median_energy", "median member"),
                           ("probe_energy", "fixed random states")):  # fmt: skip
            ax.plot(g, [r[key] for r in rows], label=label)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("generation")
        gaps = [r["probe_gap"] for r in rows]
        third = max(1, len(gaps) // 3)
        print(
            f"{name}: probe gap (fixed random - best): first third mean "
            f"{sum(gaps[:third]) / third:.3f}, last third mean {sum(gaps[-third:]) / third:.3f}; "
            f"probe energy first {rows[0]['probe_energy']:.3f}, last {rows[-1]['probe_energy']:.3f}"
        )
    axes[0][0].set_ylabel("energy (loss on the generation's batch)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1])
