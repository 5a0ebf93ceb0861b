"""The portable copy the Ray actors build their replicas from (models.portable_copy), and the
weightless skeleton the evaluators get (models.skeleton, models.materialize).

The copy must behave as the model does, bit for bit, in both modes and with masks applied; the
copy must be refused (None: the actors build the model by name) whenever it could differ; and a
process that unpickles it must not import torchvision (the point of it: seconds of CPU per actor).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx
from torch import nn

from edrop_ray.config import load_config
from edrop_ray.masking import Masker
from edrop_ray.models import (
    build_model,
    example_input,
    materialize,
    portable_copy,
    skeleton,
    synced_tensors,
)
from edrop_ray.units import check_fits, discover_units


def _outputs(model: nn.Module, x: torch.Tensor, *, train: bool, seed: int = 0) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(seed)  # dropout (SqueezeNet) draws from the global generator
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_the_copy_computes_what_the_model_computes(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1)
    example = example_input(1, 32)
    copy = portable_copy(model, example)
    assert isinstance(copy, torch.fx.GraphModule)
    assert copy.training == model.training
    # the same tensors under the same names: state dicts, units and hooks carry over
    ours, theirs = model.state_dict(), copy.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    units = discover_units(model, example)
    check_fits(units, copy)
    x = torch.randn(4, 1, 32, 32)
    for train in (False, True):  # eval, and train (batch statistics, dropout)
        assert torch.equal(_outputs(model, x, train=train), _outputs(copy, x, train=train))
    # masked: the masking hooks of a replica act on the copy's modules as on the model's
    states = torch.rand(3, units.num_units) > 0.5
    outs = []
    for m in (model, copy):
        masker = Masker(m, units)
        masker.set_states(states)
        outs.append(_outputs(m, x.repeat(3, 1, 1, 1), train=False))
        masker.set_states(None)
    assert torch.equal(outs[0], outs[1])


def test_the_copy_leaves_the_model_and_its_hooks_alone():
    model = build_model("resnet18", num_classes=10, in_channels=1)
    units = discover_units(model, example_input(1, 32))
    Masker(model, units)  # a learner's model carries its masker's hooks
    hooked = sum(len(m._forward_hooks) for m in model.modules())
    copy = portable_copy(model, example_input(1, 32))
    assert copy is not None
    assert sum(len(m._forward_hooks) for m in copy.modules()) == 0  # a replica adds its own
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooked
    assert all(a is not b for a, b in zip(model.parameters(), copy.parameters(), strict=True))


class _ReadsTraining(nn.Module):  # e.g. stochastic depth: forward branches on self.training
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 0.5 if self.training else y


class _DataDependent(nn.Module):  # control flow on a tensor's value: not traceable
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def _foreign(x):
    return x * 2


torch.fx.wrap("_foreign")  # a call the graph keeps: a function of this (non-torch) module


class _CallsForeign(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return _foreign(self.conv(x))


def _hooked() -> nn.Module:  # a hook of the user's that changes the output: the copy drops it
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    model[0].register_forward_hook(lambda _m, _i, out: out + 1.0)
    return model


@pytest.mark.parametrize(
    "make", [_ReadsTraining, _DataDependent, _CallsForeign, _hooked],
    ids=["reads-training", "data-dependent", "foreign-function", "output-hook"],
)  # fmt: skip
def test_a_copy_that_could_differ_is_refused(make):
    model = make()
    assert portable_copy(model, torch.randn(2, 1, 8, 8)) is None
    # a plain model of the same layers is copied: the refusals above are the cause
    assert portable_copy(nn.Sequential(nn.Conv2d(1, 4, 3)), torch.randn(2, 1, 8, 8)) is not None


def test_the_skeleton_has_no_weights_and_materializes_as_zeros():
    model = build_model("resnet18", num_classes=10, in_channels=1)
    copy = portable_copy(model, example_input(1, 32))
    bare = skeleton(copy)
    synced = {name for name, _ in synced_tensors(bare)}
    assert synced and all(t.device.type == "meta" for _, t in synced_tensors(bare))
    kept = {k: t for k, t in bare.state_dict().items() if k not in synced}
    assert kept and all(t.device.type == "cpu" for t in kept.values())  # BN's batch counters
    # tens of kB: an evaluator's constructor argument stays inline (Ray's limit: 100 kB)
    assert len(pickle.dumps(bare)) < 100_000 < len(pickle.dumps(copy))
    assert next(copy.parameters()).device.type == "cpu"  # the copy itself is untouched
    made = materialize(pickle.loads(pickle.dumps(bare)))
    sd, ref = made.state_dict(), copy.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype
        assert sd[k].device.type == "cpu"
        assert not sd[k].any() if k in synced else torch.equal(sd[k], ref[k])
    made.load_state_dict(ref)  # the weights that arrive later fit
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(_outputs(made, x, train=False), _outputs(copy, x, train=False))
    assert materialize(copy) is copy  # nothing to do on a model that has its weights


def test_an_actor_built_from_the_copy_never_imports_torchvision(tmp_path):
    """In a fresh interpreter, as in a Ray worker: unpickle the copy and the skeleton, import the
    actors' module and build replicas of both with the driver's units."""
    model = build_model("resnet18", num_classes=10, in_channels=1)
    example = example_input(1, 32)
    copy = portable_copy(model, example)
    units = discover_units(model, example)
    blob = tmp_path / "model.pkl"
    cfg = load_config(None, [])  # validating a config imports the registries: here, not there
    blob.write_bytes(pickle.dumps((cfg, copy, skeleton(copy), example, units)))
    code = textwrap.dedent(
        f"""
        import pickle, sys
        import torch
        import edrop_ray.distributed.actors
        from edrop_ray.learner import Learner
        from edrop_ray.models import materialize, replica_of
        cfg, copy, bare, example, units = pickle.loads(open({str(blob)!r}, "rb").read())
        for module in (copy, materialize(bare)):
            replica = replica_of(module, example, cfg, torch.device("cpu"), units)
            assert replica.units is units
        print(sorted(m for m in ("torchvision", "torch_pruning", "sklearn") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    # the check can fail: building the model by name in the same way does import torchvision
    by_name = subprocess.run(
        [sys.executable, "-c", "import sys; from edrop_ray.models import build_model; "
         "build_model('resnet18', num_classes=10, in_channels=1); "
         "print('torchvision' in sys.modules)"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert by_name.stdout.strip() == "True"


class _Constants(nn.Module):
    """Tensors a replica does not receive as weights (integer and non-persistent buffers) and a
    weight tied to another: the skeleton must keep the first with their values and the tie."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.register_buffer("order", torch.tensor([3, 1, 0, 2]))  # integer: not synced
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)  # not synced

    def forward(self, x):
        return self.b(self.a(x)[:, self.order] * self.scale)


def test_the_skeleton_keeps_what_a_replica_does_not_receive():
    torch.manual_seed(0)
    model = _Constants()
    bare = skeleton(model)
    assert torch.equal(bare.order, model.order) and torch.equal(bare.scale, model.scale)
    assert bare.a.weight.device.type == "meta" and bare.b.weight is bare.a.weight
    made = materialize(pickle.loads(pickle.dumps(bare)))
    assert made.b.weight is made.a.weight  # still tied after the zeros
    with torch.no_grad():  # the synced tensors arrive (as the transport writes them)
        for (_, dst), (_, src) in zip(synced_tensors(made), synced_tensors(model), strict=True):
            dst.copy_(src)
    x = torch.randn(3, 4)
    assert torch.equal(made(x), model(x))
