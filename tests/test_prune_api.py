"""edrop_ray.prune on a user's own network: the example, the slimmed model, kept weights, and
bad input refused before anything is written."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from example_module import load_example
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import edrop_ray
from edrop_ray import job, store
from edrop_ray.data import load_datasets
from edrop_ray.errors import RunInterrupted, UserError
from edrop_ray.slim import load_pruned, slim_model
from edrop_ray.units import discover_units

ROOT = Path(__file__).resolve().parent.parent
SHARED_RAY = True  # test_ray_backend_* uses the session's Ray instance (tests/conftest.py)
# the smallest run: 4 training steps, 2 generations
QUICK = dict(epochs=1, population_size=4, evolve_every=2, max_generations=2, quiet=True)


def _perturb_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine terms unlike a fresh module's, so that weights the run
    re-initialised would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def _example():
    return load_example("prune_custom_cnn.py", "prune_custom_cnn")


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture(scope="module")
def digits():
    train, test, _ = load_datasets("digits", data_root=".", input_size=8)
    small = TensorDataset(train.tensors[0][:256], train.tensors[1][:256])
    return small, TensorDataset(test.tensors[0][:64], test.tensors[1][:64])


def test_example_tiny_prunes_and_the_slimmed_model_computes_the_masked_one(
    example, tmp_path, monkeypatch
):
    seen = {}
    measure = job.measure_pruned

    def spy(learner, test_set, state):  # the trained, masked network, just before slimming
        x = test_set.tensors[0][:32]
        was = learner.model.training
        learner.model.eval()
        with torch.no_grad(), learner.masker.applied(state):
            seen["masked"] = learner.model(x.to(learner.device)).cpu()
        learner.model.train(was)
        seen["x"], seen["state"] = x, state.clone()
        return measure(learner, test_set, state)

    monkeypatch.setattr(job, "measure_pruned", spy)
    out = tmp_path / "run"
    result = example.main(["--tiny", "--out", str(out)])

    assert isinstance(result, edrop_ray.PruneResult)
    assert not result.model.training
    with torch.no_grad():
        slimmed = result.model(seen["x"])
    assert torch.allclose(slimmed, seen["masked"], atol=1e-4), (
        (slimmed - seen["masked"]).abs().max()
    )
    assert torch.equal(result.mask, seen["state"]) and result.mask.dtype == torch.bool

    r = result.report
    assert r["params_pruned"] == sum(p.numel() for p in result.model.parameters())
    assert r["params_pruned"] <= 0.5 * r["params_dense"]  # target_params=0.5, on the slimmed model
    assert r["kept_units"] == int(result.mask.sum()) and r["num_units"] == result.mask.numel()
    assert r["model"] == "custom:ConcatDepthwiseNet"
    assert result.kept_per_layer == r["kept_per_layer"]
    # the depthwise conv is tied to the stem's channels; the classifier is never a unit
    assert set(r["kept_per_layer"]) == {"stem.0", "pointwise.0", "mix.0", "head.0"}

    # the run folder of `edrop-ray prune`, committed in place
    assert result.run_dir == out
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(r))
    assert store.read_marker(out)["format"] == store.RUN_FORMAT
    assert not (out / "checkpoint.pt").exists() and not (tmp_path / "run.new").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["backend"] == "local"
    mask = torch.load(out / "mask.pt", weights_only=True)
    assert torch.equal(mask["mask"], result.mask)
    reloaded = load_pruned(out / "pruned_model.pt", model=example.ConcatDepthwiseNet(width=8))
    with torch.no_grad():
        assert torch.allclose(reloaded(seen["x"]), slimmed, atol=1e-5)
    with pytest.raises(UserError, match="model=<a new instance>"):
        load_pruned(out / "pruned_model.pt")


def test_trained_weights_are_kept_and_the_users_model_is_untouched(example, digits, tmp_path):
    """With a vanishing learning rate the run cannot move the weights: the slimmed model's
    parameters are the kept slices of the weights the model was given, not fresh ones."""
    train, test = digits
    torch.manual_seed(3)
    model = example.ConcatDepthwiseNet(width=8)
    _perturb_norms(model, seed=4)
    before = copy.deepcopy(model.state_dict())
    loader = DataLoader(train, batch_size=32, shuffle=True)  # its dataset and batch size
    result = edrop_ray.prune(
        model, loader, test, out=tmp_path / "run", lr=1e-9, momentum=0.0, weight_decay=0.0,
        **QUICK,
    )  # fmt: skip
    assert result.report["steps"] == len(train) // 32 == 8
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["batch_size"] == 32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"prune() changed the caller's {k}"

    x = train.tensors[0][:2]
    expected = slim_model(model, discover_units(model, x), result.mask, x)
    got = dict(result.model.named_parameters())
    assert got.keys() == dict(expected.named_parameters()).keys()
    for name, p in expected.named_parameters():
        assert torch.allclose(got[name], p, atol=1e-6), name
    # ...and a network with other weights would not match (the check can fail)
    torch.manual_seed(5)
    other = example.ConcatDepthwiseNet(width=8)
    differ = slim_model(other, discover_units(other, x), result.mask, x)
    assert not torch.allclose(got["mix.0.weight"], differ.get_parameter("mix.0.weight"))


def test_an_interrupted_run_is_kept_and_resume_says_it_cannot_rebuild_it(
    example, digits, tmp_path, monkeypatch
):
    def interrupt(*a, **k):  # Ctrl-C once the loop has checkpointed
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "measure_pruned", interrupt)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as e:
        edrop_ray.prune(
            example.ConcatDepthwiseNet(width=8), *digits, out=out, checkpoint_every=1, **QUICK
        )
    assert e.value.run_dir == out and (out / "checkpoint.pt").is_file()
    with pytest.raises(UserError, match="pruned your own network .ConcatDepthwiseNet. from Python"):
        job.resume(out)
    # out=None: the run's temporary folder goes, and the interrupt is a plain KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as e:
        edrop_ray.prune(example.ConcatDepthwiseNet(width=8), *digits, **QUICK)
    assert not isinstance(e.value, RunInterrupted)


@pytest.mark.ray
def test_ray_backend_ships_your_model_and_ends_with_the_local_mask(example, digits, ray_cluster):
    """The module (pickled with its weights) and the data go to the actors through the object
    store; one torch thread per process makes the float sums, and so the mask, identical."""
    train, test = digits
    same = dict(QUICK, max_generations=0, batch_size=32, cpu_threads=1, num_evaluators=2)
    torch.manual_seed(0)
    model = example.ConcatDepthwiseNet(width=8)  # its class travels by value (not importable)
    local = edrop_ray.prune(model, train, test, backend="local", **same)
    on_ray = edrop_ray.prune(model, train, test, backend="ray", trainer_cpus=1, **same)
    assert on_ray.report["backend"] == "ray" and local.report["backend"] == "local"
    assert on_ray.report["generations"] == local.report["generations"] == 4
    assert torch.equal(on_ray.mask, local.mask)
    for key in ("pruned_top1", "dense_top1", "params_pruned", "macs_pruned"):
        assert on_ray.report[key] == local.report[key], key
    x = test.tensors[0][:16]
    with torch.no_grad():
        assert torch.allclose(on_ray.model(x), local.model(x), atol=1e-6)


# --- bad input: one clear line, nothing written ----------------------------------------------


class _Shuffle(nn.Module):
    """A channel shuffle: Torch-Pruning traces it, but its slimmed copy computes otherwise."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        x = self.a(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.b(x).mean((2, 3)))


class _RawParameter(nn.Module):
    """A convolution through F.conv2d and a bare nn.Parameter: no layer Torch-Pruning can cut."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        return self.fc(F.conv2d(self.a(x), self.w).mean((2, 3)))


class _ThreeChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.a(x).mean((2, 3)))


class _Ragged(Dataset):
    """Digits, but every odd-numbered input has another shape."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x[:, :4] if i % 2 else x), int(y)


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 8, 8), 0


def _with_labels(ds, labels):
    return TensorDataset(ds.tensors[0], labels)


BAD = {
    "a channel shuffle": (lambda d, e: dict(model=_Shuffle()), ValueError, "slims it wrongly"),
    "a bare parameter": (lambda d, e: dict(model=_RawParameter()), ValueError, "cannot slim"),
    "wrong input channels": (lambda d, e: dict(model=_ThreeChannels()), ValueError, "fails on"),
    "nothing to prune": (
        lambda d, e: dict(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10))),
        ValueError,
        "nothing to prune",
    ),
    "no logits": (
        lambda d, e: dict(model=nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(0))),
        ValueError,
        r"\(batch, classes\) logits",
    ),
    "not a module": (lambda d, e: dict(model=lambda x: x), TypeError, "nn.Module"),
    "ragged inputs": (
        lambda d, e: dict(train_set=_Ragged(d[0])),
        ValueError,
        r"train_set\[\d+\] has an input of shape \(1, 4, 8\)",
    ),
    "test inputs of another size": (
        lambda d, e: dict(test_set=TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4).long())),
        ValueError,
        r"shape \(1, 16, 16\)",
    ),
    "a label outside the classes": (
        lambda d, e: dict(train_set=_with_labels(d[0], d[0].tensors[1] * 0 + 10)),
        ValueError,
        r"label 10 is outside \[0, 10\)",
    ),
    "a negative label in an on-disk set": (
        lambda d, e: dict(test_set=[(torch.zeros(1, 8, 8), -1)] * 3),
        ValueError,
        r"test_set\[0\]: label -1",
    ),
    "float labels": (
        lambda d, e: dict(train_set=_with_labels(d[0], d[0].tensors[1].float())),
        ValueError,
        "integer classes",
    ),
    "an iterable dataset": (lambda d, e: dict(train_set=_Stream()), TypeError, "map-style"),
    "example inputs of another shape": (
        lambda d, e: dict(example_inputs=torch.zeros(2, 1, 4, 4)),
        ValueError,
        "example_inputs",
    ),
    "an unmeetable budget": (
        lambda d, e: dict(target_params=0.001),
        ValueError,
        "target_params=0.001 cannot be met",
    ),
    "an unknown setting": (lambda d, e: dict(population_sise=4), TypeError, "population_sise"),
    "a grid setting": (lambda d, e: dict(dataset="cifar10"), TypeError, "dataset= does not"),
    "a bad value": (lambda d, e: dict(patience=0), ValueError, "patience must be >= 1"),
    "a batch larger than the data": (lambda d, e: dict(batch_size=1000), ValueError, "batch_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(case, example, digits, tmp_path):
    make, error, message = BAD[case]
    args = dict(model=example.ConcatDepthwiseNet(width=8), train_set=digits[0], test_set=digits[1])
    args.update(make(digits, example))
    model, train_set, test_set = args.pop("model"), args.pop("train_set"), args.pop("test_set")
    with pytest.raises(error, match=message) as e:
        edrop_ray.prune(model, train_set, test_set, out=tmp_path / "run", **{**QUICK, **args})
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_import_stays_light():
    code = (
        "import sys, edrop_ray; assert 'torch' not in sys.modules; "
        "from edrop_ray import prune, PruneResult; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_cli_says_in_one_line_that_it_cannot_rebuild_your_network(
    example, digits, tmp_path, capsys
):
    """export and evaluate of a prune() run folder: one line pointing at load_pruned, exit 2."""
    from edrop_ray.cli import main

    out = tmp_path / "run"
    edrop_ray.prune(example.ConcatDepthwiseNet(width=8), *digits, out=out, **QUICK)
    for verb in ("export", "evaluate"):
        assert main([verb, str(out)]) == 2, verb
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ConcatDepthwiseNet" in err[0] and "load_pruned" in err[0], err
    assert not (out / "export").exists()
