"""The report package: imports nothing heavy until it draws; one Pareto front for sweeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from edrop_ray.report import pareto_front, sweep_markdown, trial_rows

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_package_loads_neither_matplotlib_nor_ray():
    code = (
        "import sys, edrop_ray.report, edrop_ray.space, edrop_ray.cluster, edrop_ray.compare_cli; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib'; "
        "assert 'ray' not in sys.modules, 'ray'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def _result(top1, prune_rate, error=None):
    metrics = {} if top1 is None else {"top1": top1, "top5": 99.0, "prune_rate": prune_rate}
    return SimpleNamespace(metrics=metrics, config={"lr": 0.1}, error=error, path="p")


def test_trial_rows_mark_the_pareto_front_of_the_finished_trials():
    results = [
        _result(90.0, 0.5),  # front
        _result(80.0, 0.4),  # dominated by the first
        _result(70.0, 0.9),  # front
        _result(None, None, error=RuntimeError("boom")),  # never on the front
        _result(90.0, 0.5),  # equal to the first: both stay
    ]
    rows = trial_rows(results, ["lr"])
    assert [r["status"] for r in rows].count("finished") == 4
    assert rows[-1]["status"] == "error" and rows[-1]["error"] == "boom"
    on_front = sorted((r["top1"], r["prune_rate"]) for r in rows if r["pareto"])
    assert on_front == [(70.0, 0.9), (90.0, 0.5), (90.0, 0.5)]
    points = [(r["top1"], r["prune_rate"]) for r in rows[:-1]]
    assert pareto_front(points) == [i for i, r in enumerate(rows) if r["pareto"]]
    assert all(r["params"] == {"lr": 0.1} for r in rows)


def test_sweep_markdown_is_one_line_per_trial_with_the_front_starred():
    rows = trial_rows([_result(90.0, 0.5), _result(80.0, 0.4)], ["lr"])
    text = sweep_markdown(rows, "a note")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "finished" in ln]
    assert len(lines) == 2
    assert lines[0].rstrip().endswith("| * |") and lines[1].rstrip().endswith("|  |")
    assert text.rstrip().endswith("a note")


def test_the_budget_note_names_only_the_arms_that_ran():
    from edrop_ray.report import to_markdown

    rows = [
        {
            "method": m,
            "top1": 90.0,
            "top5": 99.0,
            "params": 10,
            "macs": 20,
            "prune_rate": 0.5,
            "wall_s": 1.0,
            "train_steps": 110,
        }
        for m in ("dense", "edropout", "random-mask")
    ]
    result = {
        "model": "resnet18",
        "dataset": "digits",
        "seed": 0,
        "budget": "equal-steps",
        "total_steps": 110,
        "finetune_steps": 30,
        "finetune_start_step": 80,
        "rows": rows,
    }
    note = to_markdown(result).strip().splitlines()[-1]
    assert "Random-mask trains a random state" in note and "110 steps" in note
    for absent in ("Magnitude", "edropout-s4", "frozen-first-gen", "paper-schedule"):
        assert absent not in note
