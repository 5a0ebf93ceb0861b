"""Budgets in parameters and MACs: the count from the unit structure is exactly Torch-Pruning's
count on the slimmed model, repair makes every state fit, and a run ends within its budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edrop_ray.budget import build_counter, repair_budget
from edrop_ray.slim import count_params_macs, slim_model
from edrop_ray.units import discover_units


class ConcatNet(nn.Module):
    """stem -> (depthwise 3x3 | grouped 3x3, groups=4 | pointwise 1x1) concatenated -> conv ->
    max-pool -> flatten -> linear -> linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())  # no BN: masked here
        self.grouped = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, groups=4), nn.ReLU())
        self.mix = nn.Sequential(
            nn.Conv2d(56, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Linear(24 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        p = self.pointwise(x)
        x = torch.cat([self.depthwise(x), p, self.grouped(self.tail(p))], dim=1)
        return self.head(self.mix(x).flatten(1))


def random_states(units, n: int, seed: int, keep_full: tuple[int, ...] = ()) -> torch.Tensor:
    """(n, D) states over a spread of keep rates, every second one with whole groups off."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.05, 0.95, n)
    states = torch.rand(n, units.num_units, generator=g) < rates[:, None]
    for i in range(0, n, 2):
        for grp in units.groups:
            if bool(torch.rand(1, generator=g) < 0.4):
                states[i, grp.offset : grp.offset + grp.size] = False
    for j in keep_full:
        grp = units.groups[j]
        states[:, grp.offset : grp.offset + grp.size] = True
    return states


def assert_exact(model, units, x, counter, states) -> None:
    params, macs = counter.count(states)
    for i, state in enumerate(states):
        want = count_params_macs(slim_model(model, units, state, x), x)
        assert (int(params[i]), int(macs[i])) == want, f"state {i}"


def test_count_is_exact_on_the_grid(grid_model):
    name, model, units, x = grid_model
    counter = build_counter(model, units, x, verify=False)
    dense = torch.ones(1, units.num_units, dtype=torch.bool)
    assert tuple(int(v) for v in counter.count(dense)) == (
        counter.dense_params,
        counter.dense_macs,
    )
    assert (counter.dense_params, counter.dense_macs) == count_params_macs(model, x)
    states = random_states(units, 3, seed=hash(name) % 1000)
    all_off = torch.zeros(1, units.num_units, dtype=torch.bool)
    assert_exact(model, units, x, counter, torch.cat([states, all_off]))


def test_count_is_exact_with_concat_depthwise_and_grouped_conv():
    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    counter = build_counter(model, units, x)  # verify=True: one slim at build time
    # slim_model cannot prune through a grouped conv (Torch-Pruning leaves its channel groups
    # uncoupled), so the groups around it stay full; every other group is random or all off.
    assert counter.grouped
    assert len(counter.grouped) < len(units.groups)
    assert_exact(model, units, x, counter, random_states(units, 8, 1, counter.grouped))


def test_count_is_vectorised_and_monotone(grid_model):
    _name, model, units, x = grid_model
    counter = build_counter(model, units, x, verify=False)
    states = random_states(units, 64, seed=2)
    params, macs = counter.count(states)
    assert params.shape == macs.shape == (64,)
    # switching any one more unit off never makes a state dearer
    off = states.clone()
    for i in range(64):
        on = states[i].nonzero().flatten()
        if on.numel():
            off[i, on[0]] = False
    p2, m2 = counter.count(off)
    assert bool((p2 <= params).all()) and bool((m2 <= macs).all())


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_repair_meets_macs_and_params_budgets(target):
    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    counter = build_counter(model, units, x, verify=False)
    states = random_states(units, 16, seed=3)
    max_macs = int(target * counter.dense_macs)
    max_params = int(target * counter.dense_params)
    g = torch.Generator().manual_seed(0)
    fixed = repair_budget(states, counter, max_params=max_params, max_macs=max_macs, generator=g)
    params, macs = counter.count(fixed)
    assert bool((macs <= max_macs).all()) and bool((params <= max_params).all())
    assert bool((fixed <= states).all())  # repair only switches units off
    fitting = (counter.count(states)[0] <= max_params) & (counter.count(states)[1] <= max_macs)
    assert torch.equal(fixed[fitting], states[fitting])  # states that fit are left alone


def test_search_keeps_every_state_within_budget_and_refuses_the_impossible():
    from edrop_ray.errors import UserError
    from edrop_ray.search import DEParams, Search

    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    counter = build_counter(model, units, x, verify=False)
    params = DEParams(population_size=6, target_params=0.4, target_macs=0.3, macs_lambda=0.5)
    search = Search(params, units.num_units, counter=counter)
    for _ in range(3):
        candidates = search.propose()
        p, m = counter.count(candidates)
        assert bool((p <= 0.4 * counter.dense_params).all())
        assert bool((m <= 0.3 * counter.dense_macs).all())
        search.select(torch.zeros(len(candidates)))
    # with equal losses the MACs penalty decides: the best member is the cheapest one
    _p, m = counter.count(search.population.states)
    assert int(counter.count(search.best[None])[1][0]) == int(m.min())
    with pytest.raises(ValueError, match="counter"):
        Search(DEParams(target_macs=0.5), units.num_units)
    with pytest.raises(UserError, match="cannot be met"):
        Search(DEParams(target_macs=1e-6), units.num_units, counter=counter)


def test_run_with_target_macs_ends_within_budget(tmp_path):
    import json
    from pathlib import Path

    from edrop_ray.cli import main
    from edrop_ray.report import summary_rows
    from edrop_ray.slim import load_pruned

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    argv = ["prune", "--config", tiny, "--out", str(out), "--quiet"]
    assert main([*argv, "--set", "backend=local", "--set", "target_macs=0.25"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target_macs"] == 0.25 and report["target_params"] is None
    assert report["macs_pruned"] <= 0.25 * report["macs_dense"]
    assert report["macs_kept"] == report["macs_pruned"] / report["macs_dense"]
    rows = {r[0]: r for r in summary_rows(report)}
    assert rows["MACs kept (budget)"][2] == f"{100 * report['macs_kept']:.1f}% (<= 25.0%)"
    assert "params kept (budget)" not in rows  # no params budget was asked for
    # measured again on the saved, physically slimmed model
    slim = load_pruned(out / "pruned_model.pt")
    x = torch.zeros(1, 1, 16, 16)
    assert count_params_macs(slim, x)[1] == report["macs_pruned"] <= 0.25 * report["macs_dense"]


def test_edropout_api_takes_a_macs_budget():
    from edrop_ray import EDropout

    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 1, 8, 8)
    ed = EDropout(model, x, population_size=4, target_macs=0.5)
    _p, macs = ed.search.counter.count(ed.propose())
    assert bool((macs <= 0.5 * ed.search.counter.dense_macs).all())


def test_counter_pickles_to_the_ray_coordinator():
    """The Ray coordinator builds its Search from the counter the driver sent it (pickled)."""
    import pickle

    from edrop_ray.config import Config
    from edrop_ray.distributed.coordinator import Coordinator

    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    counter = build_counter(model, units, x, verify=False)
    sent = pickle.loads(pickle.dumps(counter))
    states = random_states(units, 8, seed=4)
    (p1, m1), (p2, m2) = sent.count(states), counter.count(states)
    assert torch.equal(p1, p2) and torch.equal(m1, m2)
    cfg = Config(target_macs=0.3, population_size=4)
    coordinator = Coordinator(cfg, units.num_units, [], None, counter=sent)
    assert coordinator.search.max_macs == int(0.3 * counter.dense_macs)
    _p, macs = sent.count(coordinator.search.population.states)
    assert bool((macs <= 0.3 * counter.dense_macs).all())
