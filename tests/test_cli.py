"""The CLI end to end on the tiny config, its artefacts, reproducibility, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from edrop_ray.cli import main
from edrop_ray.files import read_population
from edrop_ray.models import build_model
from edrop_ray.slim import load_pruned

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
REPORT_KEYS = {
    "dense_top1", "pruned_top1", "dense_top5", "pruned_top5", "params_dense", "params_pruned",
    "prune_rate", "macs_dense", "macs_pruned", "generations", "converged_at", "wall_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["prune", "--config", TINY, "--out", str(out), "--quiet"]) == 0
    return out


def test_tiny_run_writes_every_artefact(tiny_run):
    out = tiny_run
    for name in ("config.yaml", "report.json", "history.parquet", "population.parquet",
                 "mask.pt", "pruned_model.pt", "plots/energy.png", "plots/diversity.png",
                 "plots/kept_fraction.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()  # a finished run needs no checkpoint
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert 0.0 <= report["pruned_top1"] <= report["pruned_top5"] <= 100.0
    assert report["params_pruned"] < report["params_dense"]
    # the dense count is the untouched architecture's, counted here independently
    dense = build_model("resnet18", num_classes=10, in_channels=1)
    assert report["params_dense"] == sum(p.numel() for p in dense.parameters())
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert len(history) == report["generations"] > 0
    for key in ("best_energy", "mean_energy", "diversity", "kept_fraction", "train_loss",
                "seconds"):  # fmt: skip
        assert key in history[0]
    # the search stops evolving once frozen: only the last generation may say frozen
    assert [r["frozen"] for r in history[:-1]] == [False] * (len(history) - 1)
    if report["converged_at"] is not None:
        assert history[-1]["frozen"] and history[-1]["generation"] == report["converged_at"]
    mask = torch.load(out / "mask.pt", weights_only=True)["mask"]
    assert mask.dtype == torch.bool and int(mask.sum()) == report["kept_units"]
    pops = read_population(out / "population.parquet")
    assert 0 in pops and pops[0].shape[1] == mask.numel()
    assert bool(pops[0][0].all())  # member 0 starts dense
    model = load_pruned(out / "pruned_model.pt")
    assert sum(p.numel() for p in model.parameters()) == report["params_pruned"]
    with torch.no_grad():
        logits = model(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_same_seed_gives_same_final_mask(tiny_run, tmp_path):
    again = tmp_path / "again"
    assert main(["prune", "--config", TINY, "--out", str(again), "--quiet"]) == 0
    a = torch.load(tiny_run / "mask.pt", weights_only=True)["mask"]
    b = torch.load(again / "mask.pt", weights_only=True)["mask"]
    assert torch.equal(a, b)
    ra = json.loads((tiny_run / "report.json").read_text())
    rb = json.loads((again / "report.json").read_text())
    assert ra["pruned_top1"] == rb["pruned_top1"] and ra["generations"] == rb["generations"]


def test_out_dir_holding_a_run_is_refused_then_overwritten(tiny_run, capsys):
    before = (tiny_run / "report.json").read_bytes()
    assert main(["prune", "--config", TINY, "--out", str(tiny_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (tiny_run / "report.json").read_bytes() == before  # nothing the user saved is lost


BAD = [
    (["--set", "model=vgg_nope"], "unknown model 'vgg_nope'", "resnet18"),
    (["--set", "dataset=imagenet"], "unknown dataset 'imagenet'", "digits"),
    (["--set", "populaton_size=8"], "unknown config key 'populaton_size'", "population_size"),
    (["--set", "population_size=many"], "population_size must be int", "--set"),
    (["--set", "population_size=3"], "population_size must be >= 4", "3"),
    (["--set", "F=1.5"], "F must be in [0, 1]", "1.5"),
    (["--set", "CR=-0.1"], "CR must be in [0, 1]", "-0.1"),
    (["--set", "target_prune_rate=1.0"], "target_prune_rate must be in [0, 1)", "1.0"),
    (["--set", "epochs"], "--set needs key=value", "epochs"),
    (["--set", "dataset=cifar10", "--set", "data_root=/nonexistent/x"], "cifar10", "download"),
]


@pytest.mark.parametrize("extra,message,hint", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_gives_one_line_and_exit_2(extra, message, hint, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--config", TINY, "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err and hint in err
    assert not out.exists()  # nothing half-written


def test_missing_config_file(tmp_path, capsys):
    assert main(["prune", "--config", str(tmp_path / "nope.yaml"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err


def test_nan_loss_stops_with_exit_2_and_leaves_the_disk_as_it_was(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["prune", "--config", TINY, "--out", str(out), "--quiet", "--set", "lr=1e30"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lr" in err and len(err.splitlines()) == 1
    # it failed before its first checkpoint: nothing to resume, so nothing is left behind
    assert not out.exists()


def test_console_entry_point_runs_as_a_module(tmp_path):
    """`python -m edrop_ray` is what `ray job submit` runs; its exit code must carry."""
    proc = subprocess.run(
        [sys.executable, "-m", "edrop_ray", "prune", "--config", TINY, "--set", "F=2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "edrop-ray: error: F must be in [0, 1], got 2.0"


def test_default_config_file_matches_builtin_defaults():
    """`edrop-ray prune` with no --config runs the built-in defaults; the YAML must agree."""
    from edrop_ray.config import Config, load_config

    assert load_config(ROOT / "configs" / "digits_resnet18.yaml") == Config()


def test_resume_refuses_a_corrupt_checkpoint_and_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: digits\n")
    good = ROOT / "configs" / "tiny.yaml"
    (run / "config.yaml").write_text(good.read_text())
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and len(err.strip().splitlines()) == 1
    assert (run / "checkpoint.pt").read_bytes() == b"PK\x03\x04 truncated"  # never deleted


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path), "--quiet"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one whole."""
    from edrop_ray import store

    store.save_checkpoint(tmp_path, {"format": "edrop_ray.checkpoint/1", "step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        store.save_checkpoint(tmp_path, {"format": "edrop_ray.checkpoint/1", "step": 2})
    monkeypatch.undo()
    assert store.load_checkpoint(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


@pytest.mark.parametrize("kept", [True, False])
def test_ctrl_c_names_the_real_folder(tmp_path, monkeypatch, capsys, kept):
    from edrop_ray import job
    from edrop_ray.errors import RunInterrupted

    out = tmp_path / "run"

    def interrupted(cfg, out_, **k):
        raise RunInterrupted(tmp_path / "run.new" if kept else None, out)

    monkeypatch.setattr(job, "prune", interrupted)
    assert main(["prune", "--config", TINY, "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DIR" not in err
    if kept:
        assert err.endswith(f"edrop-ray resume {tmp_path / 'run.new'}")
    else:
        assert f"{out} is as it was" in err
