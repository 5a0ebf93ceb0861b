"""timm models by name (``model: timm:<name>``, the optional extra ``edrop-ray[timm]``): traced
into units, counted exactly as Torch-Pruning counts the slimmed model, and pruned end to end.
Bad names and a missing timm are one line that says how to fix it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from edrop_ray.budget import build_counter
from edrop_ray.cli import main
from edrop_ray.errors import UserError
from edrop_ray.imports import module_file
from edrop_ray.models import build_model, example_input, load_init_weights
from edrop_ray.slim import count_params_macs, load_pruned, slim_model
from edrop_ray.units import discover_units

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
NAME = "timm:resnet10t"  # a deep (3-conv) stem, residual stages, 5 M parameters


def _random_states(num_units: int, n: int, seed: int) -> torch.Tensor:
    """(n, D) states over a spread of keep rates, the first one all off."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.0, 0.9, n)
    return torch.rand(n, num_units, generator=g) < rates[:, None]


def test_a_timm_model_is_built_as_timm_builds_it():
    torch.manual_seed(0)
    ours = build_model(NAME, num_classes=10, in_channels=1)
    torch.manual_seed(0)
    theirs = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    pairs = zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True)
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs)
    assert ours(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_the_count_of_a_timm_model_is_torch_prunings_on_the_slimmed_model():
    torch.manual_seed(0)
    model = build_model(NAME, num_classes=10, in_channels=1)
    x = example_input(1, 16)
    units = discover_units(model, x)
    counter = build_counter(model, units, x)  # verify=True: one slim at build time
    assert not counter.grouped
    assert (counter.dense_params, counter.dense_macs) == count_params_macs(model, x)
    states = _random_states(units.num_units, 4, seed=1)
    params, macs = counter.count(states)
    for i, state in enumerate(states):
        want = count_params_macs(slim_model(model, units, state, x), x)
        assert (int(params[i]), int(macs[i])) == want, f"state {i}"


def test_init_weights_load_into_a_timm_model(tmp_path):
    torch.manual_seed(3)
    source = build_model(NAME, num_classes=10, in_channels=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = build_model(NAME, num_classes=10, in_channels=1)
    load_init_weights(target, str(path))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_the_dense_cache_key_follows_the_timm_release():
    # dense_key hashes this file for a model by path: timm's version.py, not its __init__.py
    assert Path(module_file(NAME)) == Path(timm.__file__).with_name("version.py")


def test_prune_a_timm_model_to_a_macs_budget(tmp_path):
    out = tmp_path / "run"
    sets = [f"model={NAME}", "target_macs=0.5", "max_generations=2", "batch_size=256"]
    argv = ["prune", "--config", TINY, "--backend", "local", "--out", str(out), "--quiet"]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == NAME
    assert report["macs_pruned"] <= 0.5 * report["macs_dense"]
    slim = load_pruned(out / "pruned_model.pt")  # rebuilt by its name, then slimmed
    x = torch.zeros(1, 1, 16, 16)
    assert count_params_macs(slim, x)[1] == report["macs_pruned"]
    assert slim(x).shape == (1, 10)


def test_an_unknown_timm_name_is_one_line_that_says_what_to_do(tmp_path, capsys):
    with pytest.raises(UserError, match=r"unknown timm model 'resnet_nope'.*timm.list_models"):
        build_model("timm:resnet_nope", num_classes=10, in_channels=1)
    argv = ["prune", "--config", TINY, "--out", str(tmp_path / "new"), "--quiet"]
    assert main([*argv, "--set", "model=timm:resnet_nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown timm model 'resnet_nope'" in err[0]
    assert not (tmp_path / "new").exists()


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(UserError, match=r"needs timm.*pip install 'edrop-ray\[timm\]'"):
        build_model(NAME, num_classes=10, in_channels=1)


def test_a_budget_the_counter_cannot_model_is_one_line_before_any_training(tmp_path, capsys):
    """timm's MobileNetV3 traces, but its unit count differs from Torch-Pruning's: a MACs budget
    is refused before the dense baseline, in one line, with nothing written."""
    argv = ["prune", "--config", TINY, "--out", str(tmp_path / "new"), "--quiet", "--backend",
            "local", "--set", "model=timm:mobilenetv3_small_050", "--set", "input_size=16",
            "--set", "target_macs=0.5"]  # fmt: skip
    cache = Path(os.environ["EDROP_RAY_CACHE"])
    before = sorted(cache.rglob("*.json"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot take target_params, target_macs or macs_lambda" in err[0]
    assert not (tmp_path / "new").exists()
    assert sorted(cache.rglob("*.json")) == before  # no dense baseline was trained
