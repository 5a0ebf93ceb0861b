"""The variants measured in results/: ``energy_bn: batch`` (each candidate's replica normalised on
its own batch statistics) and ``train_state: sampled`` (training samples population members)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edrop_ray.config import load_config
from edrop_ray.energy import compute_energies, compute_energies_looped
from edrop_ray.errors import UserError
from edrop_ray.masking import Masker
from edrop_ray.models import build_model, example_input
from edrop_ray.search import Search
from edrop_ray.units import discover_units


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, small_input=True)
    units = discover_units(model, example_input(1, 16))
    with torch.no_grad():  # running statistics far from any batch's: the two modes must differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(0.1)
    return model, units


def test_batched_per_replica_energies_match_one_pass_per_state(net):
    model, units = net
    masker = Masker(model, units)
    g = torch.Generator().manual_seed(1)
    states = torch.rand(5, units.num_units, generator=g) < 0.6
    x, y = torch.randn(6, 1, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
    before = copy.deepcopy(model.state_dict())
    batched = compute_energies(model, masker, states, x, y, states_per_pass=3, bn="batch")
    looped = compute_energies_looped(model, masker, states, x, y, bn="batch")
    running = compute_energies(model, masker, states, x, y, states_per_pass=3, bn="running")
    # a state's replica is normalised only on itself: stacking others beside it changes nothing
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-4)
    assert (batched - running).abs().max() > 0.1  # the running statistics are not used
    after = model.state_dict()  # nor updated
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in model.modules())  # the patch is undone


def test_one_state_is_batch_norm_in_training_mode(net):
    model, units = net
    masker = Masker(model, units)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    dense = torch.ones(1, units.num_units, dtype=torch.bool)
    energy = compute_energies(model, masker, dense, x, y, bn="batch")
    train_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = F.cross_entropy(train_mode(x), y)
    torch.testing.assert_close(energy[0], expected, rtol=1e-4, atol=1e-4)


def test_batch_statistics_need_the_local_backend():
    with pytest.raises(UserError, match="backend=local"):
        load_config(None, ["energy_bn=batch", "backend=ray"])
    assert load_config(None, ["energy_bn=batch", "backend=local"]).energy_bn == "batch"


def test_sampled_training_state_follows_the_energies_and_stops_at_the_freeze():
    cfg = load_config(None, ["population_size=4", "backend=local", "train_state=sampled"])
    search = Search.from_config(cfg, num_units=64)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(search.sample_member(g), search.best)  # nothing judged yet: the best
    candidates = search.propose()
    # member/trial 0 far better than the rest: it wins selection and is drawn most often
    search.select(torch.tensor([0.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0]))
    members = search.population.states
    draws = [search.sample_member(g) for _ in range(400)]
    index = [next(i for i in range(4) if torch.equal(d, members[i])) for d in draws]
    counts = torch.bincount(torch.tensor(index), minlength=4)
    assert counts[0] > 200 and counts[1:].sum() > 20  # energy-weighted, yet not only the best
    assert torch.equal(members[0], candidates[0])
    search.frozen = True
    assert all(torch.equal(search.sample_member(g), search.best) for _ in range(20))
    with pytest.raises(UserError, match="backend=local"):
        load_config(None, ["train_state=sampled", "backend=ray"])
