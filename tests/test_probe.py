"""``probe_members``: fixed random states judged beside the search, for the dynamics; they must
leave the search exactly as it is without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.errors import UserError
from edrop_ray.learner import Learner
from edrop_ray.loop import run_edropout
from edrop_ray.search import DEParams, Search

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
BASE = ["cpu_threads=1", "backend=local"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_for(load_config(TINY, BASE))


def _run(data, *overrides: str, steps: int = 10) -> tuple[Search, list[dict]]:
    train_set, _test, info = data
    learner = Learner(load_config(TINY, [*BASE, *overrides]), train_set, info, CPU)
    learner.total_steps = steps
    search = Search.from_config(learner.cfg, learner.units.num_units)
    history: list[dict] = []
    run_edropout(learner, search, on_generation=history.append)
    return search, history


def test_probes_leave_the_search_unchanged_and_are_recorded(data):
    plain, plain_history = _run(data)
    probed, history = _run(data, "probe_members=3")
    assert torch.equal(plain.best, probed.best)
    assert torch.equal(plain.population.states, probed.population.states)
    assert [r["best_energy"] for r in plain_history] == [r["best_energy"] for r in history]
    assert [r["train_loss"] for r in plain_history] == [r["train_loss"] for r in history]
    assert all("probe_energy" not in r for r in plain_history)
    assert len(history) >= 3
    for r in history:
        assert torch.isfinite(torch.tensor(r["probe_energy"]))
        assert r["probe_gap"] == pytest.approx(r["probe_energy"] - r["best_energy"])


def test_probes_are_fixed_seeded_and_obey_the_budget():
    a = Search(DEParams(probe_members=4, seed=3, target_prune_rate=0.75), 200)
    b = Search(DEParams(probe_members=4, seed=3, target_prune_rate=0.75), 200)
    c = Search(DEParams(probe_members=4, seed=4, target_prune_rate=0.75), 200)
    assert a.probes.shape == (4, 200) and a.probes.dtype == torch.bool
    assert torch.equal(a.probes, b.probes) and not torch.equal(a.probes, c.probes)
    assert int(a.probes.sum(dim=1).max()) <= 50  # the same kept-unit cap as every member
    # drawing them does not move the population's own stream
    plain = Search(DEParams(seed=3, target_prune_rate=0.75), 200)
    assert torch.equal(plain.population.states, a.population.states)
    assert Search(DEParams(seed=3), 200).probes is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["probe_members=65"], "probe_members must be in [0, 64]"),
        (["probe_members=-1"], "probe_members must be in [0, 64]"),
        (["probe_members=2", "backend=ray"], "probe_members is implemented in process only"),
    ],
)
def test_bad_probe_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, [*BASE, *overrides])
