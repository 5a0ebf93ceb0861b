"""``edrop-ray report | export | evaluate`` on a real tiny run, and the paper-grid script."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from edrop_ray import inspect_run, job
from edrop_ray.cli import main
from edrop_ray.config import load_config
from edrop_ray.data import DataInfo
from edrop_ray.report import pareto_front
from edrop_ray.slim import load_pruned

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, report) of one finished tiny run, shared by the module."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    report = job.prune(load_config(REPO / "configs" / "tiny.yaml"), out, quiet=True)
    return out, report


@pytest.fixture
def unfinished(run, tmp_path):
    """A run directory that has a config but no results (as a stopped run before resume)."""
    path = tmp_path / "stopped"
    path.mkdir()
    shutil.copy(run[0] / "config.yaml", path / "config.yaml")
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("edrop-ray: error: ")
    assert "\n" not in err and "Traceback" not in err
    return err


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------- report


def test_report_md_prints_the_metrics_and_writes_every_plot(run, capsys):
    run_dir, report = run
    shutil.rmtree(run_dir / "plots")  # report rewrites them all
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| Top-1 (%) |" in out and "| pruning rate |" in out
    assert f"{report['pruned_top1']:.2f}" in out and f"{report['dense_top1']:.2f}" in out
    assert f"{100 * report['prune_rate']:.1f}%" in out
    for name in ("energy", "diversity", "kept_fraction", "kept_per_layer"):
        assert is_png(run_dir / "plots" / f"{name}.png"), name


def test_report_json_is_the_run_report(run, capsys):
    run_dir, report = run
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["kind"] == "run"
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert blob["report"] == on_disk
    assert blob["report"]["pruned_top1"] == pytest.approx(report["pruned_top1"])
    assert blob["report"]["kept_per_layer"] == pytest.approx(report["kept_per_layer"])
    assert {Path(p).name for p in blob["plots"]} >= {"kept_per_layer.png", "energy.png"}


SWEEP = [  # the rows of edrop_ray.tune's sweep.json (only the fields report reads)
    {"trial_id": "t0", "params": {"F": 0.9, "CR": 0.7}, "status": "finished", "top1": 90.0,
     "top5": 99.0, "prune_rate": 0.30, "params_pruned": 7_000_000},
    {"trial_id": "t1", "params": {"F": 0.5, "CR": 0.7}, "status": "finished", "top1": 85.0,
     "top5": 98.0, "prune_rate": 0.60, "params_pruned": 4_000_000},
    {"trial_id": "t2", "params": {"F": 0.5, "CR": 0.3}, "status": "finished", "top1": 80.0,
     "top5": 97.0, "prune_rate": 0.50, "params_pruned": 5_000_000},  # dominated by t1
    {"trial_id": "t3", "params": {"F": 0.1, "CR": 0.3}, "status": "error", "top1": None,
     "top5": None, "prune_rate": None, "params_pruned": None},  # listed, never plotted
]  # fmt: skip


@pytest.mark.parametrize("shape", ["tune", "list"])
def test_report_sweep_writes_pareto_plot(tmp_path, capsys, shape):
    blob = {"format": "edrop_ray.sweep/1", "trials": SWEEP} if shape == "tune" else SWEEP
    (tmp_path / "sweep.json").write_text(json.dumps(blob))
    (tmp_path / "config.yaml").write_text("dataset: digits\n")  # a sweep may keep its base config
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert is_png(tmp_path / "pareto.png")
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 1 + len(SWEEP)  # header + one line per trial
    marked = [line.split(" | ")[1] for line in lines[1:] if line.endswith("* |")]
    assert marked == ["t0", "t1"]
    assert "F=0.9, CR=0.7" in out and "60.00" in out and "error" in out

    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["kind"] == "sweep" and blob["pareto"] == [0, 1]
    assert len(blob["trials"]) == len(SWEEP)


def test_report_rejects_a_broken_sweep_json(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "sweep.json" in one_line_error(capsys)
    assert not (tmp_path / "pareto.png").exists()


def test_pareto_front():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # (top1, prune rate): 2 is dominated by 1; 3 ties 0 on top1 but prunes less
    pts = [(90, 0.3), (85, 0.6), (80, 0.5), (90, 0.2), (70, 0.9)]
    assert pareto_front(pts) == [0, 1, 4]
    assert pareto_front([(5, 5), (5, 5), (1, 1)]) == [0, 1]  # equal points both stay
    assert pareto_front([(math.nan, 9.0), (1.0, 1.0)]) == [1]  # NaN neither counts nor dominates
    # every front point is undominated and every other point is dominated by one of the front
    g = torch.Generator().manual_seed(0)
    cloud = [tuple(p) for p in torch.rand(60, 2, generator=g).tolist()]
    front = pareto_front(cloud)

    def dominates(a, b):
        return a[0] >= b[0] and a[1] >= b[1] and a != b

    for i, p in enumerate(cloud):
        beaten = any(dominates(q, p) for q in cloud)
        assert beaten == (i not in front)


# ---------------------------------------------------------------------------------------- export


def reference(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    blob = torch.load(run_dir / "pruned_model.pt", weights_only=True)
    return load_pruned(run_dir / "pruned_model.pt"), inspect_run.check_batch(blob, 5)


def test_export_state_dict_round_trip(run, tmp_path, capsys):
    run_dir, _ = run
    target = tmp_path / "deep" / "model.pt"
    assert main(["export", str(run_dir), "--format", "state_dict", "--output", str(target)]) == 0
    assert "check: max |exported - slimmed| =" in capsys.readouterr().out
    slim, x = reference(run_dir)
    again = load_pruned(target)  # outside no_grad: rebuilding traces with autograd
    with torch.no_grad():
        assert torch.allclose(again(x), slim(x), atol=1e-5)
    blob = torch.load(target, weights_only=True)  # plain tensors and a recipe: no pickled code
    assert set(blob["state_dict"]) == set(slim.state_dict())
    assert blob["model"] == "resnet18" and blob["mask"].dtype == torch.bool
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]  # no temporary left behind


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_round_trip_and_default_path(run, capsys):
    run_dir, _ = run
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    target = run_dir / "export" / "model.ts"
    assert "check: max |exported - slimmed|" in capsys.readouterr().out
    slim, x = reference(run_dir)
    loaded = torch.jit.load(str(target))
    with torch.no_grad():
        assert torch.allclose(loaded(x), slim(x), atol=1e-5)  # another batch size than the trace
    # an export is derived: exporting again replaces it
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    assert target.is_file()


def test_export_onnx_without_onnx_says_how_to_install(run, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec

    def missing_onnx(name, *a, **k):
        return None if name in ("onnx", "onnxscript") else real(name, *a, **k)

    monkeypatch.setattr(inspect_run.importlib.util, "find_spec", missing_onnx)
    target = tmp_path / "m.onnx"
    assert main(["export", str(run[0]), "--format", "onnx", "--output", str(target)]) == 2
    err = one_line_error(capsys)
    assert "pip install onnx onnxscript" in err
    assert not target.exists()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")),
    reason="onnx export needs onnx and onnxscript (not dependencies)",
)
def test_export_onnx_round_trip(run, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    assert main(["export", str(run[0]), "--format", "onnx", "--output", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.is_file()
    if importlib.util.find_spec("onnxruntime") is None:
        assert "check: skipped" in out
        return
    assert "(ok," in out
    import onnxruntime as ort

    slim, x = reference(run[0])
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})  # dynamic batch: 5, traced with 8
    with torch.no_grad():
        expected = slim(x)
    assert torch.allclose(
        torch.from_numpy(got), expected, atol=inspect_run.check_tolerance(expected)
    )


def test_export_refuses_a_folder_as_output(run, tmp_path, capsys):
    assert main(["export", str(run[0]), "--output", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_matches_the_run_report(run, capsys):
    run_dir, report = run
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    top1 = float(re.search(r"Top-1 ([0-9.]+)%", out).group(1))
    top5 = float(re.search(r"Top-5 ([0-9.]+)%", out).group(1))
    # the slimmed model computes what the masked model computed for the report
    assert top1 == pytest.approx(report["pruned_top1"], abs=0.01)
    assert top5 == pytest.approx(report["pruned_top5"], abs=0.01)


def test_evaluate_rejects_a_dataset_the_model_does_not_fit(run, capsys, monkeypatch):
    def other_shape(name, **kwargs):
        return None, None, DataInfo(name, 100, 3, 10, 10)

    monkeypatch.setattr(inspect_run, "load_datasets", other_shape)
    assert main(["evaluate", str(run[0]), "--dataset", "cifar100"]) == 2
    err = one_line_error(capsys)
    assert "100 classes" in err and "--dataset" in err


def test_evaluate_missing_data_names_data_root(run, tmp_path, capsys):
    args = ["evaluate", str(run[0]), "--dataset", "cifar10", "--data-root", str(tmp_path)]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "cifar-10-batches-py" in err and "--data-root" in err


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("verb", ["report", "export", "evaluate"])
def test_not_a_run_directory(verb, tmp_path, capsys):
    assert main([verb, str(tmp_path / "nowhere")]) == 2
    err = one_line_error(capsys)
    assert "is not a run" in err


@pytest.mark.parametrize("verb", ["report", "export", "evaluate"])
def test_unfinished_run_says_to_resume(verb, unfinished, capsys):
    assert main([verb, str(unfinished)]) == 2
    err = one_line_error(capsys)
    assert "has not finished" in err and "edrop-ray resume" in err
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.yaml"]  # nothing written


# ------------------------------------------------------------------------------------ paper grid


def load_grid_script():
    spec = importlib.util.spec_from_file_location("paper_grid", REPO / "scripts" / "paper_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_grid_tiny_end_to_end(run, tmp_path, capsys):
    grid = load_grid_script()
    out = tmp_path / "grid"
    assert grid.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "paper_grid.json").read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["dataset"], row["model"]) == ("digits", "resnet18")
    assert row["status"].startswith("ok (ran")
    assert 0.0 < row["prune_rate"] < 1.0
    # same config and seed as the module's run: the same result
    assert row["pruned_top1"] == pytest.approx(run[1]["pruned_top1"])
    assert row["dense_top1"] == pytest.approx(run[1]["dense_top1"])
    table = (out / "paper_grid.md").read_text()
    assert "| digits | resnet18 |" in table and "baseline Top-1" in table
    assert (out / "runs" / "digits-resnet18" / "report.json").is_file()
    # running the grid again reads the finished row back instead of redoing it
    assert grid.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    again = json.loads((out / "paper_grid.json").read_text())["rows"]
    assert again[0]["status"].startswith("ok (reused")
    assert again[0]["pruned_top1"] == row["pruned_top1"]


def test_paper_grid_records_missing_data_and_goes_on(tmp_path, capsys):
    grid = load_grid_script()
    out = tmp_path / "grid"
    args = ["--datasets", "cifar10", "fashion_mnist", "--models", "resnet18", "alexnet",
            "--set", f"data_root={tmp_path / 'no-data'}", "--out", str(out)]  # fmt: skip
    assert grid.main(args) == 0
    rows = json.loads((out / "paper_grid.json").read_text())["rows"]
    assert [(r["dataset"], r["model"]) for r in rows] == [
        ("cifar10", "resnet18"), ("cifar10", "alexnet"),
        ("fashion-mnist", "resnet18"), ("fashion-mnist", "alexnet"),
    ]  # fmt: skip
    assert all(r["status"].startswith("missing data: ") for r in rows)
    assert all(r["pruned_top1"] is None for r in rows)
    assert "missing data: dataset 'cifar10'" in (out / "paper_grid.md").read_text()


def test_paper_grid_bad_arguments(tmp_path, capsys):
    grid = load_grid_script()
    assert grid.main(["--models", "vgg11", "--out", str(tmp_path)]) == 2
    assert "unknown model 'vgg11'" in capsys.readouterr().err
    assert grid.main(["--set", "model=alexnet", "--out", str(tmp_path)]) == 2
    assert "--models" in capsys.readouterr().err
    assert grid.main(["--datasets", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown grid dataset" in capsys.readouterr().err
    assert not (tmp_path / "paper_grid.json").exists()
