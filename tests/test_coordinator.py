"""The coordinator actor's own logic, in process (no Ray cluster): it proposes the next
generation while the trainer trains, and that changes nothing a run computes or saves."""

from __future__ import annotations

import pytest
import torch

from edrop_ray.config import Config
from edrop_ray.distributed.coordinator import Coordinator
from edrop_ray.search import Search


def _energies(candidates: torch.Tensor) -> torch.Tensor:
    """A fixed energy per state (its kept fraction, and a hash of its bits): deterministic."""
    weights = torch.linspace(0.5, 1.5, candidates.shape[1], dtype=torch.float64)
    return candidates.double() @ weights / candidates.shape[1]


def _coordinator(cfg: Config, num_units: int) -> Coordinator:
    coordinator = Coordinator(cfg, num_units, [], None)
    coordinator._evaluate = lambda candidates, *_args: _energies(candidates)
    coordinator.pool.num_healthy = lambda: 1
    return coordinator


def _plain(search: Search) -> dict:
    """One generation of the in-process search, as the local backend runs it."""
    return search.select(_energies(search.propose()))


def test_proposing_ahead_draws_and_saves_what_the_search_in_process_does():
    cfg = Config(population_size=6, seed=3, diversity_threshold=0.0, patience=1000)
    units = 40
    coordinator, search = _coordinator(cfg, units), Search.from_config(cfg, units)
    for _ in range(4):
        out = coordinator.generation([None], None, 0)
        record = _plain(search)
        assert out["record"]["best_energy"] == record["best_energy"]
        assert torch.equal(coordinator.population()[0], search.population.states)
        assert torch.equal(coordinator.population()[1], search.population.energies)
        assert torch.equal(out["best"], search.best)
        # the next generation is being proposed already; a checkpoint taken now is the
        # search's state before that proposal: the same draws on resume
        assert coordinator._ahead is not None
        saved, plain = coordinator.state_dict(), search.state_dict()
        assert saved.keys() == plain.keys()
        for key, value in plain.items():
            assert torch.equal(saved[key], value) if torch.is_tensor(value) else saved[key] == value
    # resumed from that checkpoint, a fresh coordinator continues exactly as the search does
    resumed = _coordinator(cfg, units)
    resumed.load_state_dict(coordinator.state_dict())
    out, record = resumed.generation([None], None, 0), _plain(search)
    assert torch.equal(resumed.population()[0], search.population.states)
    assert out["record"]["best_energy"] == record["best_energy"]
    # and the one that proposed ahead goes on with the same candidates too
    coordinator.generation([None], None, 0)
    assert torch.equal(coordinator.population()[0], resumed.population()[0])


def test_a_frozen_search_proposes_nothing_ahead():
    cfg = Config(population_size=4, seed=0, max_generations=1)
    coordinator = _coordinator(cfg, 12)
    out = coordinator.generation([None], None, 0)
    assert out["record"]["frozen"] and coordinator._ahead is None


def test_a_proposal_that_fails_ahead_fails_the_next_generation_not_the_checkpoint():
    cfg = Config(population_size=4, seed=1, diversity_threshold=0.0, patience=1000)
    coordinator, search = _coordinator(cfg, 16), Search.from_config(cfg, 16)

    def boom():
        raise RuntimeError("the proposal failed")

    coordinator.generation([None], None, 0)
    _plain(search)
    coordinator.search.propose = boom  # the next proposal, made ahead, fails
    coordinator.generation([None], None, 0)
    _plain(search)
    assert torch.equal(coordinator.state_dict()["generator"], search.state_dict()["generator"])
    with pytest.raises(RuntimeError, match="the proposal failed"):
        coordinator.generation([None], None, 0)
