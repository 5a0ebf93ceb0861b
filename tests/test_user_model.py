"""The user's own network: models and data sets by import path, every torchvision classifier by
name, and initial weights from a state_dict file. Bad input keeps the CLI contract (exit 2, one
stderr line, no traceback, the folder as it was; see tests/test_contract.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edrop_ray import job
from edrop_ray.cli import main
from edrop_ray.config import dense_key, load_config
from edrop_ray.data import DataInfo, load_user_datasets
from edrop_ray.errors import UserError
from edrop_ray.models import MODELS, build_model, build_replica, example_input, find_stem
from edrop_ray.units import discover_units

SHARED_RAY = True  # the session's Ray instance, started only by the test that asks for it
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
USER = ["model=examples.user_model:make", "dataset=examples.user_model:digits", "input_size=8"]
FAST = ["batch_size=256", "eval_batch_size=512", "energy_batch_size=8", "max_generations=2"]


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


# --------------------------------------------------------------------------- models by name


@pytest.mark.parametrize(
    "name", ["examples.user_model:make", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf"]
)
def test_models_beyond_the_grid_build_and_trace_at_16px(name):
    model = build_model(name, num_classes=10, in_channels=1)
    units = discover_units(model, example_input(1, 16))
    assert units.num_units > 0
    _, stem = find_stem(model, in_channels=1)
    assert stem.in_channels == 1
    if ":" not in name:  # the torchvision ones get the small stem
        assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_stem_without_small_input_keeps_its_geometry():
    model = build_model("efficientnet_b0", num_classes=5, in_channels=1, small_input=False)
    name, stem = find_stem(model, in_channels=1)
    assert name == "features.0.0"
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (2, 2))


def test_the_papers_seven_are_built_as_before():
    """The grid keeps its own by-name stems (bit-identical weights for a seed)."""
    torch.manual_seed(0)
    new = build_model("resnet18", num_classes=10, in_channels=1)
    torch.manual_seed(0)
    old = MODELS["resnet18"](weights=None, num_classes=10)
    old.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    pairs = zip(new.state_dict().values(), old.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_model_that_fails_at_small_inputs_is_one_user_error():
    cfg = load_config(TINY, ["model=vgg11", "input_size=8"])
    with pytest.raises(UserError, match=r"model 'vgg11' cannot be traced .*input_size"):
        build_replica(cfg, DataInfo("digits", 10, 1, 10, 10), torch.device("cpu"))


def test_config_checks_the_syntax_of_an_import_path_only():
    assert load_config(None, ["model=not_imported.anywhere:fn"], names=False).model
    with pytest.raises(UserError, match="is not an import path"):
        load_config(None, ["model=a.b:c-d"], names=False)
    with pytest.raises(UserError, match="is not an import path"):
        load_config(None, ["dataset=a-b:c"], names=False)
    assert load_config(None, ["model=mobilenet_v2"]).model == "mobilenet_v2"
    with pytest.raises(UserError, match="unknown model 'vgg_nope'"):
        load_config(None, ["model=vgg_nope"])


# --------------------------------------------------------------------------- init_weights


def test_init_weights_are_the_start_of_every_replica(tmp_path):
    info = DataInfo("digits", 10, 1, 10, 10)
    torch.manual_seed(123)
    source = build_model("resnet18", num_classes=10, in_channels=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    cfg = load_config(TINY, [f"init_weights={path}"])
    got = build_replica(cfg, info, torch.device("cpu")).model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
    key = dense_key(cfg)
    assert key != dense_key(replace(cfg, init_weights=""))  # the dense run starts there too
    torch.save({k: v + 1 for k, v in source.state_dict().items()}, path)
    assert dense_key(cfg) != key  # new weights in the same file: a new dense baseline


@pytest.mark.parametrize(
    "blob, match",
    [
        ("missing", "not found"),
        (b"not a zip", "cannot be read as a state_dict"),
        ({"conv1.weight": torch.zeros(64, 1, 3, 3)}, "key 'bn1.weight' is missing"),
        ("extra", "key 'extra' is unexpected"),
        ("shape", r"'fc.weight' has shape \(3, 512\) in the file but \(10, 512\)"),
    ],
)
def test_init_weights_that_do_not_fit_name_the_first_misfit(tmp_path, blob, match):
    info = DataInfo("digits", 10, 1, 10, 10)
    path = tmp_path / "w.pt"
    full = build_model("resnet18", num_classes=10, in_channels=1).state_dict()
    if blob == "extra":
        torch.save({**full, "extra": torch.zeros(1)}, path)
    elif blob == "shape":
        torch.save({**full, "fc.weight": torch.zeros(3, 512)}, path)
    elif isinstance(blob, bytes):
        path.write_bytes(blob)
    elif isinstance(blob, dict):
        torch.save(blob, path)
    cfg = load_config(TINY, [f"init_weights={path}"])
    with pytest.raises(UserError, match=match):
        build_replica(cfg, info, torch.device("cpu"))


# --------------------------------------------------------------------------- data by import path


class _Named(TensorDataset):
    classes = ("a", "b", "c", "d", "e")


def test_user_data_infers_channels_and_classes(monkeypatch):
    import examples.user_model as um

    train, test, info = load_user_datasets("examples.user_model:digits", input_size=8)
    assert (info.num_classes, info.in_channels, info.train_size) == (10, 1, len(train))
    x = torch.zeros(6, 3, 4, 4)
    monkeypatch.setattr(um, "named", lambda: (_Named(x, torch.zeros(6).long()),) * 2, raising=False)
    _, _, info = load_user_datasets("examples.user_model:named", input_size=4)
    assert (info.num_classes, info.in_channels) == (5, 3)  # `classes`, not the largest label
    with pytest.raises(UserError, match="add --set input_size=4"):
        load_user_datasets("examples.user_model:named", input_size=8)
    pair = (TensorDataset(x, torch.zeros(6, dtype=torch.int32)),) * 2
    monkeypatch.setattr(um, "named", lambda: pair)
    with pytest.raises(UserError, match="labels must be int64"):
        load_user_datasets("examples.user_model:named", input_size=4)


# --------------------------------------------------------------------------- end to end


def test_prune_a_torchvision_model_beyond_the_grid(tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--config", TINY, "--backend", "local", "--out", str(out), "--quiet",
                 *_sets(["model=mobilenet_v2", "input_size=8", *FAST])])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "mobilenet_v2" and report["params_pruned"] < report["params_dense"]


def test_prune_the_users_model_and_data_in_process_and_on_ray(tmp_path, ray_cluster):
    local = tmp_path / "local"
    assert main(["prune", "--config", TINY, "--backend", "local", "--out", str(local), "--quiet",
                 *_sets([*USER, *FAST])]) == 0  # fmt: skip
    report = json.loads((local / "report.json").read_text())
    assert report["model"] == "examples.user_model:make" and report["generations"] == 2
    from edrop_ray.slim import load_pruned  # export and evaluate rebuild it by its import path

    assert load_pruned(local / "pruned_model.pt")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    on_ray = tmp_path / "ray"
    job.prune(load_config(TINY, [*USER, *FAST, "backend=ray"]), on_ray, quiet=True)
    ray_report = json.loads((on_ray / "report.json").read_text())
    assert ray_report["backend"] == "ray" and ray_report["num_units"] == report["num_units"]


# --------------------------------------------------------------------------- bad input, CLI

USERMODS = """
import torch
from torch import nn


def boom(num_classes, in_channels):
    raise RuntimeError("no GPU here")


def text(num_classes, in_channels):
    return "a model"


def not_a_pair():
    return 3


def small(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
"""

BAD = {
    "module-not-found": (["model=nope.mod:fn"], "no module named 'nope'"),
    "not-a-factory": (["model=os:getcwd"], "'os:getcwd' raised TypeError"),
    "wrong-type": (["model=usermods:text"], "returned a str, not a torch.nn.Module"),
    "dataset-wrong-type": (["dataset=os:getcwd"], "returned a str, not (train, test)"),
    "factory-raises": (["model=usermods:boom"], "'usermods:boom' raised RuntimeError: no GPU here"),
    "no-attribute": (["model=usermods:nothing"], "has no attribute 'nothing'"),
    "dataset-not-a-pair": (["dataset=usermods:not_a_pair"], "returned a int, not (train, test)"),
    "bad-syntax": (["model=usermods:no-such"], "is not an import path"),
    "init-weights-missing": (["init_weights=nope.pt"], "init_weights file 'nope.pt' not found"),
    "init-weights-misfit": (["init_weights=w.pt"], "does not fit the model: 'fc.weight'"),
    "small-input-fails": (["model=vgg11"], "model 'vgg11' cannot be traced"),
}


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts
    }


def _run_bad(d: Path, sets: list[str]) -> tuple[int, str, dict, dict]:
    before = _snapshot(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "EDROP_RAY_CACHE": str(d / ".." / "cache")}  # fmt: skip
    argv = ["prune", "--config", TINY, "--quiet", "--backend", "local", "--out", "new",
            *_sets(["input_size=8", "batch_size=256", *sets])]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "edrop_ray", *argv], capture_output=True,
                          text=True, cwd=d, env=env, timeout=300)  # fmt: skip
    return proc.returncode, proc.stderr, before, _snapshot(d)


@pytest.fixture(scope="module")
def bad_outcomes(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("bad")
    weights = build_model("resnet18", num_classes=3, in_channels=1).state_dict()
    jobs = {}
    for name, (sets, _) in BAD.items():
        d = base / name
        d.mkdir()
        (d / "usermods.py").write_text(USERMODS)
        torch.save(weights, d / "w.pt")
        jobs[name] = (d, sets)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {n: pool.submit(_run_bad, d, s) for n, (d, s) in jobs.items()}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_user_code_is_one_line_and_writes_nothing(name, bad_outcomes):
    rc, err, before, after = bad_outcomes[name]
    lines = err.strip().splitlines()
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert BAD[name][1] in lines[0], lines[0]
    assert after == before
