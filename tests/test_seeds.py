"""The named random streams of one seed are independent, repeatable and wired where they belong."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from edrop_ray import job
from edrop_ray.config import load_config
from edrop_ray.data import load_datasets, load_for
from edrop_ray.errors import UserError
from edrop_ray.learner import Learner
from edrop_ray.search import Search
from edrop_ray.seeds import STREAMS, STREAMS_VERSION, stream, stream_seed, stream_seeds

ROOT = Path(__file__).resolve().parent.parent


def _draw(g: torch.Generator, n: int = 64) -> torch.Tensor:
    return torch.randint(0, 2**62, (n,), generator=g)


def test_same_inputs_give_the_same_stream():
    for name in STREAMS:
        assert stream_seed(7, name, 3) == stream_seed(7, name, 3)
        assert torch.equal(_draw(stream(7, name, 3)), _draw(stream(7, name, 3)))


def test_streams_with_another_seed_name_or_index_differ():
    keys = [(s, n, *i) for s in (0, 1, 2) for n in STREAMS for i in ((), (0,), (1,), (0, 1))]
    seeds = {k: stream_seed(k[0], k[1], *k[2:]) for k in keys}
    assert len(set(seeds.values())) == len(keys)  # no two of them share a seed
    for a, b in itertools.combinations(keys[:12], 2):
        g, h = stream(a[0], a[1], *a[2:]), stream(b[0], b[1], *b[2:])
        assert not torch.equal(_draw(g), _draw(h)), (a, b)


def test_seed_s_population_is_not_seed_s_minus_1_energy_stream():
    # seed, seed + 1, ... made seed s's population stream seed s-1's energy stream
    for s in range(1, 6):
        assert not torch.equal(_draw(stream(s, "population")), _draw(stream(s - 1, "energy_batch")))


def test_the_derivation_is_pinned_to_its_version():
    """Changing the derivation changes every run: it must come with a STREAMS_VERSION bump (which
    keys the dense cache), and then these numbers with it."""
    assert STREAMS_VERSION == 2  # 2: each member's trial from a stream of its own
    # cross-checked as SeedSequence(...).generate_state(1, np.uint64) & (2**63 - 1)
    assert stream_seed(0, "init") == 5463442446747207670
    assert stream_seed(3, "data_order", 2) == 7237889238353639111


def test_a_members_seed_is_the_same_whatever_the_population_size():
    many = stream_seeds(5, "trial", 3, count=64)
    assert stream_seeds(5, "trial", 3, count=4) == many[:4]
    assert stream_seeds(5, "trial", 3, count=1)[0] == stream_seed(5, "trial", 3) == many[0]
    assert len(set(many)) == 64 and stream_seeds(5, "trial", 4, count=4) != many[:4]


def test_bad_names_and_indexes_are_refused():
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "energy")
    with pytest.raises(ValueError, match="non-negative"):
        stream_seed(0, "data_order", -1)
    with pytest.raises(ValueError, match="non-negative"):
        stream_seed(-1, "init")


@pytest.fixture(scope="module")
def learner() -> Learner:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cpu_threads=1", "epochs=3"])
    train_set, _test, info = load_for(cfg)
    learner = Learner(cfg, train_set, info, torch.device("cpu"))
    # a dataset whose samples are their own indexes, so batches show which samples they took
    n = len(train_set)
    learner.train_set = TensorDataset(torch.arange(n), torch.arange(n))
    return learner


def test_the_energy_batch_is_not_a_training_batch(learner):
    assert learner.energy_generator.get_state().equal(stream(0, "energy_batch").get_state())
    energy = set(learner.draw_energy_batch()[0].tolist())
    bs, n = learner.cfg.batch_size, len(learner.train_set)
    for epoch in range(learner.cfg.epochs):
        first = set(learner.train_batch(epoch * learner.steps_per_epoch)[0].tolist())
        assert len(first) == bs
        assert energy != first
        assert not energy <= first, f"energy batch inside epoch {epoch}'s first batch"
    # the old derivation (energy: seed + 1; epoch e: seed * 100003 + e) made them the same
    old_energy = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    old_epoch1 = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    assert old_energy[: len(energy)].tolist() == old_epoch1[: len(energy)].tolist()


def test_each_epoch_has_its_own_order(learner):
    orders = [learner.train_batch(e * learner.steps_per_epoch)[0] for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    again = learner.train_batch(learner.steps_per_epoch)[0]  # found again from its step alone
    assert torch.equal(again, orders[1])


def test_the_search_draws_from_the_population_stream():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["seed=5"])
    a, b = Search.from_config(cfg, num_units=40), Search.from_config(cfg, num_units=40)
    assert torch.equal(a.population.states, b.population.states)
    other = Search.from_config(
        load_config(ROOT / "configs" / "tiny.yaml", ["seed=4"]), num_units=40
    )
    assert not torch.equal(a.population.states, other.population.states)


def test_the_data_split_is_stable_for_a_seed():
    torch.manual_seed(123)  # the split never reads torch's global generator
    a, _, _ = load_datasets("digits", data_root="unused", seed=3)
    torch.manual_seed(456)
    b, _, _ = load_datasets("digits", data_root="unused", seed=3)
    c, _, _ = load_datasets("digits", data_root="unused", seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])


def test_a_checkpoint_from_other_streams_is_not_resumed(tmp_path):
    job.check_streams({"streams": STREAMS_VERSION}, tmp_path)
    for old in ({}, {"streams": STREAMS_VERSION - 1}):  # no field: written before named streams
        with pytest.raises(UserError, match="random streams version"):
            job.check_streams(old, tmp_path)
