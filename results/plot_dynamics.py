"""Search dynamics over seeds: ``python results/plot_dynamics.py results/digits``.

Reads ``seed<N>/history.parquet`` (copied from each seed's EDropout run by run_compare.sh) and
writes ``dynamics.png`` beside them (edrop_ray.report.write_dynamics_plot), and prints, per seed,
the generation after which the best state never changed again and the energy gap then.
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


if __name__ == "__main__":
    main(sys.argv[1])
