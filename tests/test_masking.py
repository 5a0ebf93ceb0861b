"""Masking, energy and slimming invariants over the whole model grid (32 px, CPU)."""

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

from edrop_ray.energy import compute_energies, compute_energies_looped
from edrop_ray.masking import Masker
from edrop_ray.models import build_model
from edrop_ray.slim import count_params_macs, slim_model
from edrop_ray.units import check_fits


def random_states(n, num_units, seed, p=0.6):
    return torch.rand(n, num_units, generator=torch.Generator().manual_seed(seed)) < p


def test_units_exclude_the_classifier_and_cover_the_model(grid_model):
    name, model, units, x = grid_model
    assert units.num_units > 0
    assert sum(g.size for g in units.groups) == units.num_units
    modules = dict(model.named_modules())
    for layer, unit_of in units.channel_units.items():
        out = getattr(modules[layer], "out_channels", None) or getattr(
            modules[layer], "out_features", None
        )
        assert out != 7 or isinstance(modules[layer], nn.BatchNorm2d), (
            f"{name}: classifier {layer} must not be a unit"
        )
        assert unit_of.min() >= 0 and unit_of.max() < units.num_units
    assert set(units.mask_points) <= set(units.channel_units)


def test_units_traced_elsewhere_fit_the_same_model_and_no_other(grid_model):
    """The actors take the driver's units instead of tracing their own copy: on a copy of the
    same model they pass the check; on a model with other layers or widths they are refused."""
    name, model, units, x = grid_model
    check_fits(units, copy.deepcopy(model))
    other = build_model("resnet18" if name != "resnet18" else "alexnet", num_classes=7)
    with pytest.raises(ValueError, match="units"):
        check_fits(units, other)
    narrower = copy.deepcopy(model)
    layer = next(iter(units.channel_units))
    module = dict(narrower.named_modules())[layer]
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attr):
            setattr(module, attr, getattr(module, attr) - 1)
    with pytest.raises(ValueError, match="output channels"):
        check_fits(units, narrower)


def test_units_pickle_compactly_and_come_back_the_same(grid_model):
    """Units travel to every actor inline in its creation call: consecutive channels pickle as
    (first unit, width), any other layer as its tensor, and all come back equal, with the mask
    points still the very tensors of the channel map."""
    _name, _model, units, _x = grid_model
    layer = next(iter(units.channel_units))
    shuffled = dict(units.channel_units)
    shuffled[layer] = units.channel_units[layer].flip(0)  # not consecutive: sent as a tensor
    odd = dataclasses.replace(units, channel_units=shuffled)
    for u in (units, odd):
        back = pickle.loads(pickle.dumps(u))
        assert (back.groups, back.num_units) == (u.groups, u.num_units)
        assert list(back.channel_units) == list(u.channel_units)
        assert list(back.mask_points) == list(u.mask_points)
        for k, v in u.channel_units.items():
            assert torch.equal(back.channel_units[k], v) and back.channel_units[k].dtype == v.dtype
        assert all(back.mask_points[k] is back.channel_units[k] for k in back.mask_points)
    assert len(pickle.dumps(units)) < 8 * sum(v.numel() for v in units.channel_units.values())


def test_masked_unit_outputs_zero_and_gets_zero_gradient(grid_model):
    name, model, units, x = grid_model
    masker = Masker(model, units)
    state = random_states(1, units.num_units, seed=3)[0]
    seen = {}
    modules = dict(model.named_modules())
    # Hooks registered after the masker's see what flows on from the mask point.
    probes = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
        for n in units.mask_points
    ]
    try:
        model.train()
        model.zero_grad()
        with masker.applied(state):
            loss = model(x).square().mean()
            loss.backward()
    finally:
        for p in probes:
            p.remove()
        masker.remove()
    checked = 0
    for layer, unit_of in units.mask_points.items():
        off = ~state[unit_of]
        checked += int(off.any())
        assert torch.count_nonzero(seen[layer][:, off]) == 0, f"{name}:{layer} leaks"
    # the check means something only where the state switched channels off: at most points
    assert checked >= len(units.mask_points) // 2, f"{name}: only {checked} points were masked"
    for layer, unit_of in units.channel_units.items():
        off = ~state[unit_of]
        for p in modules[layer].parameters(recurse=False):
            assert p.grad is not None
            assert torch.count_nonzero(p.grad[off]) == 0, f"{name}:{layer} gets gradient"
    # and the kept units do learn
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.parameters() if p.grad is not None)


def test_masker_never_copies_and_removes_cleanly(grid_model):
    name, model, units, x = grid_model
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        dense = model(x)
    masker = Masker(model, units)
    with torch.no_grad(), masker.applied(random_states(1, units.num_units, 4)[0]):
        masked = model(x)
    with torch.no_grad():
        after_context = model(x)
    masker.remove()
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert not torch.allclose(masked, dense)
    assert torch.equal(after_context, dense)


def test_batched_energies_equal_looped(grid_model):
    name, model, units, x = grid_model
    y = torch.tensor([1, 4])
    masker = Masker(model, units)
    states = random_states(5, units.num_units, seed=5)
    states[0] = True
    try:
        batched = compute_energies(model, masker, states, x, y, sparsity_lambda=0.3)
        chunked = compute_energies(model, masker, states, x, y, states_per_pass=2,
                                   sparsity_lambda=0.3)  # fmt: skip
        looped = compute_energies_looped(model, masker, states, x, y, sparsity_lambda=0.3)
    finally:
        masker.remove()
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, looped, atol=1e-4, rtol=1e-4)
    assert len(set(batched.tolist())) > 1  # different states really are judged differently


@pytest.mark.parametrize("all_off_group", [False, True])
def test_slimmed_model_computes_what_the_masked_model_computes(grid_model, all_off_group):
    name, model, units, x = grid_model
    state = random_states(1, units.num_units, seed=6)[0]
    if all_off_group:  # a whole coupled group off: its last channel stays, silenced
        g = units.groups[len(units.groups) // 2]
        state[g.offset : g.offset + g.size] = False
    masker = Masker(model, units)
    model.eval()
    with torch.no_grad(), masker.applied(state):
        masked = model(x)
    masker.remove()
    slim = slim_model(model, units, state, x).eval()
    with torch.no_grad():
        slimmed = slim(x)
    torch.testing.assert_close(slimmed, masked, atol=1e-4, rtol=1e-4)
    params_dense, macs_dense = count_params_macs(model, x)
    params_slim, macs_slim = count_params_macs(slim, x)
    assert params_slim < params_dense and macs_slim < macs_dense
    # the original model is untouched by slimming
    with torch.no_grad():
        assert model(x).shape == masked.shape
