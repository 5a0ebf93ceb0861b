"""benchmarks/bench_population.py's summary on fabricated run folders (no prune run is started)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_population.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_population", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_PATH.parent))
    return module


def fake_run(folder: Path, *, top1: float, generations: int, seed: int, converged=True) -> None:
    """A finished run folder: report.json and a history.parquet with the real columns."""
    folder.mkdir(parents=True)
    report = {
        "seed": seed, "dense_top1": 90.0 + seed, "dense_top5": 99.0, "pruned_top1": top1,
        "pruned_top5": top1 + 5, "prune_rate": 0.5, "params_kept": 0.5, "macs_kept": 0.4,
        "macs_dense": 100, "macs_pruned": 40, "generations": generations,
        "converged_at": generations if converged else None, "steps": 2 * generations,
        "wall_s": 10.0 + seed, "dense_wall_s": 5.0,
    }  # fmt: skip
    (folder / "report.json").write_text(json.dumps(report))
    rows = [
        {
            "generation": g,
            "best_energy": 2.0 / g,
            "mean_energy": 3.0 / g,
            "diversity": 0.5 / g,
            "kept_fraction": 0.5,
            "frozen": g == generations,
            "best_changed_bits": 1,
            "median_energy": 2.5 / g,
            "energy_gap": 0.5 / g,
            "energy_seconds": 0.1,
            "step": 2 * g,
            "train_loss": 1.0,
            "seconds": float(g),
        }  # fmt: skip
        for g in range(1, generations + 1)
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "history.parquet")


def build(tmp_path: Path, bench, top1: dict[tuple[int, int], float]) -> None:
    for (size, seed), t in top1.items():
        fake_run(bench.run_dir(tmp_path, size, seed), top1=t, generations=3 + seed, seed=seed)


def test_means_stds_and_evaluations(tmp_path, bench):
    top1 = {(8, 0): 80.0, (8, 1): 82.0, (64, 0): 90.0, (64, 1): 91.0}
    build(tmp_path, bench, top1)
    summary = bench.summarise(tmp_path, [8, 64], [0, 1], plot=False)
    rows = {r["S"]: r for r in summary["rows"]}
    assert rows[8]["n"] == rows[64]["n"] == 2
    assert rows[8]["pruned_top1"]["mean"] == pytest.approx(81.0)
    assert rows[8]["pruned_top1"]["sd"] == pytest.approx(statistics.stdev([80.0, 82.0]))
    assert rows[64]["pruned_top5"]["mean"] == pytest.approx(95.5)
    assert rows[8]["prune_rate_pct"]["mean"] == pytest.approx(50.0)
    assert rows[8]["macs_kept_pct"]["mean"] == pytest.approx(40.0)
    # 2S candidates per generation; seed 0 has 3 history rows, seed 1 has 4
    assert rows[8]["energy_evals"]["mean"] == pytest.approx((16 * 3 + 16 * 4) / 2)
    assert rows[64]["energy_evals"]["mean"] == pytest.approx((128 * 3 + 128 * 4) / 2)
    assert rows[64]["generations"]["mean"] == pytest.approx(3.5)
    assert rows[8]["wall_s"]["mean"] == pytest.approx(10.5)
    assert rows[8]["top1_per_seed"] == {"0": 80.0, "1": 82.0}
    assert rows[8]["dense_top1_mean"] == pytest.approx(90.5)
    assert summary["missing"] == []
    md = (tmp_path / "population.md").read_text()
    assert "| 8 | 2/2 | 81.00 ± 1.41 |" in md
    assert json.loads((tmp_path / "population.json").read_text())["rows"][0]["S"] == 8


def test_missing_and_failed_runs_are_left_out(tmp_path, bench):
    build(tmp_path, bench, {(8, 0): 80.0, (8, 1): 82.0, (64, 0): 90.0})
    # seed 1 of S=64 failed: its folder may even hold a stale report, which must not count
    fake_run(bench.run_dir(tmp_path, 64, 1), top1=10.0, generations=2, seed=1)
    statuses = {"S64/seed1": {"status": "failed", "rc": 1, "log_tail": "Traceback: boom"}}
    summary = bench.summarise(tmp_path, [8, 64], [0, 1, 2], statuses, plot=False)
    rows = {r["S"]: r for r in summary["rows"]}
    assert rows[64]["n"] == 1 and rows[64]["pruned_top1"]["mean"] == 90.0
    assert rows[8]["n"] == 2
    missing = {(m["S"], m["seed"]): m for m in summary["missing"]}
    assert set(missing) == {(8, 2), (64, 1), (64, 2)}
    assert missing[(64, 1)]["status"] == "failed" and "boom" in missing[(64, 1)]["log_tail"]
    assert missing[(8, 2)]["status"] == "missing"
    md = (tmp_path / "population.md").read_text()
    assert "| 64 | 1/3 |" in md and "S=64 seed 1: failed, exit 1" in md
    assert summary["verdict"]["outcome"] == "no spread"  # one seed on the S=64 side


def _rows(bench, tmp_path, top1):
    build(tmp_path, bench, top1)
    runs, _missing = bench.collect(tmp_path, [8, 64], [0, 1])
    return bench.table_rows(runs)


def test_verdict_exceeds_only_when_it_does(tmp_path, bench):
    clear = bench.verdict(
        _rows(bench, tmp_path / "a", {(8, 0): 80.0, (8, 1): 82.0, (64, 0): 90.0, (64, 1): 91.0})
    )
    assert clear["outcome"] == "better" and clear["gap"] == pytest.approx(9.5)
    assert " exceeds " in clear["sentence"] and "does not exceed" not in clear["sentence"]
    assert clear["evals_ratio"] == pytest.approx(8.0)
    # gap 1.0 against a spread of sd(80, 84) = 2.83: within
    close = bench.verdict(
        _rows(bench, tmp_path / "b", {(8, 0): 80.0, (8, 1): 84.0, (64, 0): 83.0, (64, 1): 83.0})
    )
    assert close["outcome"] == "within spread"
    assert "does not exceed" in close["sentence"]
    worse = bench.verdict(
        _rows(bench, tmp_path / "c", {(8, 0): 90.0, (8, 1): 91.0, (64, 0): 80.0, (64, 1): 80.5})
    )
    assert worse["outcome"] == "worse" and worse["gap"] < 0
    assert " exceeds " in worse["sentence"]
    none = bench.verdict(_rows(bench, tmp_path / "d", {(8, 0): 80.0, (8, 1): 82.0}))
    assert none["outcome"] == "unanswered"


def test_mean_curve_averages_what_exists(bench):
    assert bench.mean_curve([[1.0, 2.0, 3.0], [3.0]]) == [2.0, 2.0, 3.0]
    assert bench.mean_curve([]) == []


def test_plot_is_written(tmp_path, bench):
    build(tmp_path, bench, {(8, 0): 80.0, (8, 1): 82.0, (64, 0): 90.0, (64, 1): 91.0})
    bench.summarise(tmp_path, [8, 64], [0, 1])
    assert (tmp_path / "population.png").stat().st_size > 1000


def test_wall_time_leaves_out_the_dense_training(tmp_path, bench):
    build(tmp_path, bench, {(8, 0): 80.0, (64, 0): 90.0})
    # S=8 seed 0 trained the seed's dense baseline (5 s, see fake_run) into the cache after it
    # started; S=64 seed 0 found it there
    cache = tmp_path / "cache" / "dense"
    cache.mkdir(parents=True)
    (cache / "key.json").write_text(json.dumps({"top1": 90.0, "top5": 99.0, "wall_s": 5.0}))
    written = (cache / "key.json").stat().st_mtime
    for size, started in ((8, written - 100), (64, written + 100)):
        config = bench.run_dir(tmp_path, size, 0) / "config.yaml"
        config.write_text("seed: 0\n")
        os.utime(config, (started, started))
    runs, _missing = bench.collect(tmp_path, [8, 64], [0])
    assert runs[8][0]["trained_dense"] and runs[8][0]["wall_s"] == pytest.approx(5.0)
    assert not runs[64][0]["trained_dense"] and runs[64][0]["wall_s"] == pytest.approx(10.0)
