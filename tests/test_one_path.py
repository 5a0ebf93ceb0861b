"""One run path: ``prune``, ``resume``, a Tune trial, the Python API and compare's EDropout arm
all run the same run through :func:`edrop_ray.run.execute` and end with the same mask and the
same numbers for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray import tune

import edrop_ray
from edrop_ray import job, store
from edrop_ray.compare import compare
from edrop_ray.config import config_to_dict, load_config
from edrop_ray.data import load_for
from edrop_ray.learner import Learner
from edrop_ray.loop import run_dense
from edrop_ray.models import build_model, example_input
from edrop_ray.seeds import stream_seed
from edrop_ray.tune import MASK_FILE, edropout_trial

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# the tiny config on SqueezeNet (dropout included) and fewer pixels: a run takes seconds
SMALL = ["model=squeezenet1_1", "input_size=8", "cpu_threads=1"]
SAME = ("pruned_top1", "pruned_top5", "params_pruned", "macs_pruned", "kept_units", "steps")
SAME += ("generations", "converged_at", "kept_per_layer")


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, SMALL)


@pytest.fixture(scope="module")
def pruned(cfg, tmp_path_factory):
    """(report, mask) of ``job.prune``: the reference every other path is held to."""
    out = tmp_path_factory.mktemp("one") / "prune"
    outcome = job.run_new(cfg, out, quiet=True)
    assert outcome.report["generations"] >= 2, "the run must evolve, or nothing is compared"
    assert torch.equal(torch.load(out / "mask.pt", weights_only=True)["mask"], outcome.mask)
    return outcome.report, outcome.mask


def _same_numbers(report: dict, reference: dict) -> None:
    for key in SAME:
        assert report[key] == reference[key], key


def test_resume_after_the_first_checkpoint_ends_as_prune(cfg, pruned, tmp_path, monkeypatch):
    report, mask = pruned
    real = store.save_checkpoint

    class Stopped(Exception):
        pass

    def save_then_stop(run_dir, blob):
        real(run_dir, blob)
        raise Stopped

    with monkeypatch.context() as m:
        m.setattr(store, "save_checkpoint", save_then_stop)
        with pytest.raises(Stopped):
            job.prune(cfg, tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    again = job.resume(tmp_path / "run", quiet=True)
    _same_numbers(again, report)
    assert again["dense_top1"] == report["dense_top1"]
    assert torch.equal(torch.load(tmp_path / "run" / "mask.pt", weights_only=True)["mask"], mask)


def test_tune_trial_ends_as_prune(cfg, pruned, tmp_path, monkeypatch):
    report, mask = pruned
    reports: list[tuple[dict, Path | None]] = []

    def record(metrics, *, checkpoint=None):
        saved = None
        if checkpoint is not None:
            saved = Path(checkpoint.to_directory(str(tmp_path / f"ckpt{len(reports)}")))
        reports.append((dict(metrics), saved))

    monkeypatch.setattr(tune, "report", record)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    edropout_trial({}, base=config_to_dict(cfg))
    final, folder = reports[-1]
    assert torch.equal(torch.load(folder / MASK_FILE, weights_only=True)["mask"], mask)
    assert final["top1"] == report["pruned_top1"] and final["top5"] == report["pruned_top5"]
    assert final["params_pruned"] == report["params_pruned"]
    assert (final["step"], final["generation"]) == (report["steps"], report["generations"])
    # every checkpoint it reported is the run's own checkpoint.pt
    mids = [c for _m, c in reports[:-1] if c is not None]
    assert mids and all(store.load_checkpoint(c)["config"] == config_to_dict(cfg) for c in mids)


def test_compare_edropout_arm_ends_as_prune(cfg, pruned, tmp_path):
    report, mask = pruned
    compare(cfg, tmp_path / "cmp", arms=("dense", "edropout"), quiet=True)
    run = tmp_path / "cmp" / "edropout"
    assert torch.equal(torch.load(run / "mask.pt", weights_only=True)["mask"], mask)
    _same_numbers(json.loads((run / "report.json").read_text()), report)


def test_python_api_on_the_same_network_ends_as_prune(cfg, pruned):
    """edrop_ray.prune on the network prune builds from its name (same seeded weights) and the
    same data: the same run, so the same mask and Top-1."""
    report, mask = pruned
    train_set, test_set, info = load_for(cfg)
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    model = build_model(
        cfg.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        small_input=cfg.small_input,
    )
    result = edrop_ray.prune(
        model,
        train_set,
        test_set,
        example_inputs=example_input(info.in_channels, cfg.input_size),
        config=config_to_dict(cfg),  # its data and model keys do not apply: ours do
        quiet=True,
    )
    assert torch.equal(result.mask, mask)
    assert result.report["pruned_top1"] == report["pruned_top1"]
    assert result.report["dense_top1"] == report["dense_top1"]


def test_learner_takes_a_model_its_optimiser_and_a_start_step(cfg):
    """What compare's fine-tuning needs, through the constructor: an unmasked model of its own
    (e.g. a slimmed one) with its optimiser, trained from a given step to the end of the budget."""
    train_set, _test_set, info = load_for(cfg)
    shape = train_set[0][0].shape
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(shape.numel(), info.num_classes)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    total = Learner(cfg, train_set, info, torch.device("cpu")).total_steps
    learner = Learner(
        cfg,
        train_set,
        info,
        torch.device("cpu"),
        model=model,
        optimizer=optimizer,
        masked=False,
        start_step=total - 2,
    )
    assert learner.model is model and learner.optimizer is optimizer and learner.masker is None
    before = model[1].weight.detach().clone()
    run_dense(learner)
    assert learner.step == total  # two steps: from start_step to the end of the budget
    assert not torch.equal(model[1].weight, before)
    assert optimizer.param_groups[0]["lr"] == 0.05  # a given optimiser keeps its own lr
