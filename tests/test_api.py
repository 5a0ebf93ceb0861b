"""The public ask/tell API on a user's own network, and the search's extension points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from example_module import load_example

from edrop_ray import DEParams, EDropout
from edrop_ray import population as pop
from edrop_ray.config import load_config
from edrop_ray.search import Search

ROOT = Path(__file__).resolve().parent.parent


def _example():
    return load_example("own_training_loop.py", "own_loop")


@pytest.fixture(scope="module")
def example():
    return _example()


def test_custom_network_units_cover_concat_and_depthwise(example):
    model = example.TwoBranchNet()
    ed = EDropout(model, torch.randn(2, 1, 8, 8), population_size=4)
    roots = {g.root for g in ed.units.groups}
    # The depthwise conv's channels are tied to the stem's, so it is no root of its own; the
    # classifier is never one.
    assert "stem.0" in roots and "pointwise.0" in roots and "mix.0" in roots
    assert "head.2" not in roots and "depthwise.0" not in roots
    assert ed.num_units == 32 + 16 + 64 + 32


def test_apply_zeroes_pruned_channels_and_slim_computes_the_same(example):
    torch.manual_seed(0)
    model = example.TwoBranchNet().eval()
    x = torch.randn(5, 1, 8, 8)
    ed = EDropout(model, x[:2], population_size=4, seed=3)
    state = torch.rand(ed.num_units, generator=torch.Generator().manual_seed(1)) < 0.6
    seen = {}
    handle = model.mix[1].register_forward_hook(lambda m, i, o: seen.setdefault("mix", o))
    with torch.no_grad(), ed.apply(model, state):
        masked = model(x)
    handle.remove()
    off = ~state[ed.units.mask_points["mix.1"]]
    assert off.any() and bool((seen["mix"][:, off] == 0).all())
    slim = ed.slim(state).eval()
    with torch.no_grad():
        assert torch.allclose(slim(x), masked, atol=1e-5)
    assert 0.0 < ed.prune_rate(state) < 1.0
    with torch.no_grad():  # hooks off outside the block: dense again
        assert not torch.allclose(model(x), masked)
    with pytest.raises(ValueError, match="built on"):
        with ed.apply(example.TwoBranchNet(), state):
            pass


def test_ask_tell_round_and_checkpoint(example):
    torch.manual_seed(0)
    model = example.TwoBranchNet()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    ed = EDropout(model, x[:2], population_size=6, seed=7)
    assert bool(ed.best.all()), "member 0 is dense before any budget"
    candidates = ed.propose()
    assert candidates.shape == (12, ed.num_units) and candidates.dtype == torch.bool
    energies = ed.energies(candidates, x, y)
    record = ed.tell(energies)
    assert record["generation"] == 1 == ed.generation
    assert record["best_energy"] == pytest.approx(float(energies.min()))
    saved = ed.state_dict()
    again = EDropout(example.TwoBranchNet(), x[:2], population_size=6, seed=7)
    again.load_state_dict(saved)
    assert torch.equal(again.propose(), ed.propose()), "a restored search proposes the same"
    with pytest.raises(TypeError, match="population_sise"):
        EDropout(model, x[:2], population_sise=4)


def test_own_training_loop_example_runs_and_prunes(example):
    result = example.main(["--steps", "24", "--population", "4"])
    assert result["generations"] == 12
    assert result["slim_top1"] == pytest.approx(result["masked_top1"])
    assert 0.0 <= result["prune_rate"] < 1.0


def test_a_registered_mutation_is_used_by_name():
    calls = []

    @pop.register_mutation("keep_a")
    def keep_a(s_a, s_b, s_c, *, F, kappa, generator):
        calls.append(s_a.shape)
        return s_a.clone()

    try:
        assert "keep_a" in pop.mutations()
        # one function and one name: the run config accepts it too
        assert load_config(ROOT / "configs/tiny.yaml", ["mutation=keep_a"]).mutation == "keep_a"
        g = torch.Generator().manual_seed(0)
        states = torch.rand(6, 40, generator=g) < 0.5
        trials = pop.ask(states, F=0.9, CR=1.0, mutation="keep_a", generator=g)
        assert calls == [(1, 40)] * 6  # member by member: each draws from its own stream
        # CR = 1: every trial bit is the mutant's, i.e. some member's own bits.
        assert all(any(torch.equal(t, s) for s in states) for t in trials)
    finally:
        pop.unregister_mutation("keep_a")


@pytest.mark.parametrize(("mutation", "F", "CR"), [("logical", 0.2, 0.2), ("sigmoid", 0.9, 0.7)])
def test_de_finds_a_planted_optimum_that_random_search_misses(mutation, F, CR):
    """Energy = Hamming distance to a hidden state. DE reaches it; random search with the same
    number of evaluations stays far away (its best is near D/2 - a few sigma).

    (The logical operator at the paper's F = 0.9, CR = 0.7 does not: it flips most bits of
    every trial and ends 8-12 bits away, close to random search; see the README.)"""
    d, size, generations = 48, 16, 150
    target = torch.rand(d, generator=torch.Generator().manual_seed(11)) < 0.5
    params = DEParams(population_size=size, seed=5, patience=10**6, mutation=mutation, F=F, CR=CR)
    search = Search(params, d)
    for _ in range(generations):
        cand = search.propose()
        search.select((cand != target).sum(dim=1).float())
    de_best = int((search.best != target).sum())

    g = torch.Generator().manual_seed(5)
    randoms = torch.rand(2 * size * generations, d, generator=g) < 0.5
    random_best = int((randoms != target).sum(dim=1).min())
    assert de_best <= 2, f"DE ended {de_best} bits from the optimum"
    assert random_best >= 8, random_best
