"""Binary DE invariants: shapes, operators, repair, greedy selection, diversity, seeding."""

import pytest
import torch

from edrop_ray import population as pop


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_init_member_zero_is_dense_and_p0_is_respected():
    s = pop.init_states(size=64, num_units=500, p0=0.3, generator=gen())
    assert s.dtype == torch.bool and s.shape == (64, 500)
    assert bool(s[0].all())
    assert abs(float(s[1:].float().mean()) - 0.3) < 0.02


def test_parents_are_distinct():
    # Member i keeps only unit i, so an operator sees which members it was given as parents.
    seen = []

    @pop.register_mutation("record-parents")
    def record(s_a, s_b, s_c, *, F, kappa, generator):
        seen.append([s.int().argmax(dim=1) for s in (s_a, s_b, s_c)])
        return s_a

    try:
        pop.ask(torch.eye(10, dtype=torch.bool), F=0.5, CR=0.5, mutation="record-parents",
                generator=gen())  # fmt: skip
    finally:
        pop.unregister_mutation("record-parents")
    assert len(seen) == 10  # member by member, each from its own draws
    parents = torch.stack([torch.cat(rows) for rows in seen])
    assert parents.shape == (10, 3)
    for row in parents.tolist():
        assert len(set(row)) == 3


def flip_all(s_a, s_b, s_c, *, F, kappa, generator):
    """A new operator in one function: the mutant is the complement of parent a."""
    return ~s_a


def test_a_new_operator_is_one_function_and_one_name():
    from edrop_ray.search import DEParams, Search

    pop.register_mutation("flip-all")(flip_all)
    try:
        search = Search(DEParams(population_size=6, mutation="flip-all", CR=1.0, seed=1), 30)
        candidates = search.propose()
        members, trials = candidates[:6], candidates[6:]
        # CR = 1: every trial is the complement of one member
        assert all(any(torch.equal(t, ~m) for m in members) for t in trials)
        record = search.select(candidates.float().sum(dim=1))  # energy: kept units
        assert record["generation"] == 1
        assert record["best_energy"] <= float(members.float().sum(dim=1).min())
    finally:
        pop.unregister_mutation("flip-all")
    assert "flip-all" not in pop.mutations()


@pytest.mark.parametrize("mutation", pop.mutations())
def test_ask_is_seeded_and_shaped(mutation):
    s = pop.init_states(size=8, num_units=40, p0=0.5, generator=gen())
    a = pop.ask(s, F=0.9, CR=0.7, mutation=mutation, generator=gen(5))
    b = pop.ask(s, F=0.9, CR=0.7, mutation=mutation, generator=gen(5))
    c = pop.ask(s, F=0.9, CR=0.7, mutation=mutation, generator=gen(6))
    assert a.dtype == torch.bool and a.shape == s.shape
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crossover_rate_zero_keeps_members():
    s = pop.init_states(size=6, num_units=30, p0=0.5, generator=gen())
    assert torch.equal(pop.ask(s, F=0.9, CR=0.0, generator=gen(1)), s)


def test_logical_mutation_flips_only_where_b_or_c_is_set():
    # All members identical and all zero: s_b OR s_c is 0 everywhere, so nothing may flip.
    s = torch.zeros(5, 20, dtype=torch.bool)
    assert not pop.ask(s, F=1.0, CR=1.0, generator=gen()).any()
    # All ones with F=1, CR=1: every bit flips to NOT s_a = 0.
    s = torch.ones(5, 20, dtype=torch.bool)
    assert not pop.ask(s, F=1.0, CR=1.0, generator=gen()).any()


def test_sigmoid_mutation_follows_v():
    # identical members: v = s_a, so with a steep sigmoid the mutant equals s_a
    row = torch.tensor([True, False] * 10)
    s = row.expand(6, -1).clone()
    t = pop.ask(s, F=0.9, CR=1.0, mutation="sigmoid", kappa=1000.0, generator=gen())
    assert torch.equal(t, s)


def test_unknown_mutation_and_small_population_are_refused():
    s = pop.init_states(size=6, num_units=10, p0=0.5, generator=gen())
    with pytest.raises(ValueError, match="unknown mutation"):
        pop.ask(s, F=0.5, CR=0.5, mutation="gaussian", generator=gen())
    with pytest.raises(ValueError, match="at least 4"):
        pop.ask(s[:3], F=0.5, CR=0.5, generator=gen())


def test_repair_only_switches_off_and_meets_budget():
    s = pop.init_states(size=10, num_units=100, p0=0.8, generator=gen())
    r = pop.repair(s, max_kept=30, generator=gen(2))
    assert bool((r.sum(1) <= 30).all())
    assert not bool((r & ~s).any())  # never switches a unit on
    under = s.sum(1) <= 30
    assert torch.equal(r[under], s[under])  # states within budget are untouched


def test_tell_never_worsens_any_member_and_picks_lowest():
    g = gen(3)
    s = pop.init_states(size=8, num_units=16, p0=0.5, generator=g)
    p = pop.start(s)
    ties = 0
    for _ in range(20):
        trials = pop.ask(p.states, F=0.9, CR=0.7, generator=g)
        # three energy levels, so ties between member and trial occur in most generations
        member_e = torch.randint(0, 3, (8,), generator=g).float()
        trial_e = torch.randint(0, 3, (8,), generator=g).float()
        ties += int((member_e == trial_e).sum())
        new = pop.tell(p, trials, member_e, trial_e)
        assert bool((new.energies <= member_e).all())
        assert new.best_energy == float(new.energies.min())
        i = int(new.energies.argmin())
        assert torch.equal(new.best, new.states[i])
        replaced = trial_e <= member_e
        assert torch.equal(new.states[replaced], trials[replaced])
        assert torch.equal(new.states[~replaced], p.states[~replaced])
        p = new
    assert p.generation == 20
    assert ties > 20, "the energies must tie sometimes for this test to check `<=`"


@pytest.mark.parametrize("size", [7, 600])  # 600: the counts add up over chunks of 255 rows
def test_diversity_matches_pairwise_hamming(size):
    s = pop.init_states(size=size, num_units=33, p0=0.5, generator=gen(4))
    d = (s[:, None, :] != s[None, :, :]).double().sum(-1)
    expected = float(d.sum() / (size * (size - 1) * 33))
    assert abs(pop.diversity(s) - expected) < 1e-9
    assert pop.diversity(s[:1].expand(5, -1)) == 0.0


def _search(**overrides):
    from edrop_ray.config import load_config
    from edrop_ray.search import Search

    cfg = load_config("configs/tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])
    return Search.from_config(cfg, 64)


def test_search_freezes_when_best_is_unchanged_for_patience_generations():
    s = _search(patience=3, diversity_threshold=0.0)
    energies_of = lambda c: c.float().sum(1)  # noqa: E731  fewer kept units = lower energy
    gens = 0
    while not s.frozen:
        s.select(energies_of(s.propose()))
        gens += 1
        assert gens < 500
    assert s.converged_at == s.generation == gens
    assert s.population.unchanged >= 3


def test_search_freezes_when_diversity_collapses():
    s = _search(patience=10_000, diversity_threshold=0.3)
    while not s.frozen:
        record = s.select(s.propose().float().sum(1))
        assert record["generation"] < 500
    assert record["diversity"] < 0.3 and s.converged_at == record["generation"]


def test_search_respects_target_prune_rate_and_is_reproducible():
    a, b = _search(target_prune_rate=0.75), _search(target_prune_rate=0.75)
    for _ in range(5):
        ca, cb = a.propose(), b.propose()
        assert torch.equal(ca, cb)
        assert bool((ca.sum(1) <= 16).all())  # 25 % of 64 units at most
        e = -ca.float().sum(1)  # energy favours keeping: repair must still hold the budget
        a.select(e)
        b.select(e.clone())
    assert torch.equal(a.best, b.best)


def test_search_state_round_trip_continues_identically():
    a = _search()
    for _ in range(3):
        a.select(a.propose().float().sum(1))
    b = _search()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        ca, cb = a.propose(), b.propose()
        assert torch.equal(ca, cb)
        a.select(ca.float().sum(1))
        b.select(cb.float().sum(1))
    assert torch.equal(a.best, b.best) and a.generation == b.generation


def test_a_state_taken_between_proposal_and_selection_draws_the_proposal_again():
    """The Ray coordinator proposes ahead; a checkpoint taken then must resume exactly."""
    a = _search()
    a.select(a.propose().float().sum(1))
    proposed = a.propose()  # not selected yet
    b = _search()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.propose(), proposed)
    a.select(proposed.float().sum(1))
    b.select(proposed.float().sum(1))
    assert torch.equal(a.state_dict()["generator"], b.state_dict()["generator"])
    assert torch.equal(a.propose(), b.propose())


def test_search_refuses_non_finite_energies():
    from edrop_ray.errors import UserError

    s = _search()
    c = s.propose()
    e = torch.zeros(c.shape[0])
    e[1] = float("nan")
    with pytest.raises(UserError, match="lower the learning rate"):
        s.select(e)


def test_tie_lets_the_trial_in():
    """Selection is `<=`: on equal energies the trial replaces its member (`<` would not)."""
    g = gen(7)
    s = pop.init_states(size=6, num_units=24, p0=0.5, generator=g)
    trials = ~s  # every trial differs from its member in every bit
    energies = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    new = pop.tell(pop.start(s), trials, energies, energies.clone())
    assert torch.equal(new.states, trials)
    worse = pop.tell(pop.start(s), trials, energies, energies + 1e-6)
    assert torch.equal(worse.states, s)


def test_observed_flip_and_crossover_rates_match_F_and_CR():
    """Logical mutation flips s_a where u < F and (s_b or s_c); crossover takes the mutant with
    probability CR. With every member identical (s_a = s_b = s_c = s_i = all ones), a trial bit
    is 0 exactly when it came from the mutant *and* was flipped: rate F * CR. With CR = 1 it
    is F; with F = 1 it is CR. 48,000 bits each: 5 sigma is under 0.012."""
    ones = torch.ones(12, 4000, dtype=torch.bool)
    for F, CR in [(0.9, 0.7), (0.3, 1.0), (1.0, 0.4), (0.2, 0.2)]:
        trials = pop.ask(ones, F=F, CR=CR, generator=gen(11))
        off = 1.0 - float(trials.float().mean())
        assert abs(off - F * CR) < 0.012, (F, CR, off)


def test_crossover_takes_member_bits_at_rate_1_minus_CR():
    """With members all ones and the mutant all zeros (F = 1 flips every bit of s_a), a trial
    bit equals its member's with probability 1 - CR."""
    ones = torch.ones(12, 4000, dtype=torch.bool)
    trials = pop.ask(ones, F=1.0, CR=0.35, generator=gen(12))
    assert abs(float(trials.float().mean()) - 0.65) < 0.012


def test_member_zero_is_dense_unless_a_budget_repairs_it():
    from edrop_ray.search import DEParams, Search

    free = Search(DEParams(population_size=6, seed=3), 50)
    assert bool(free.population.states[0].all()) and bool(free.best.all())
    budget = Search(DEParams(population_size=6, seed=3, target_prune_rate=0.5), 50)
    assert int(budget.population.states[0].sum()) == 25
    assert bool((budget.population.states.sum(1) <= 25).all())


@pytest.mark.parametrize(
    ("mutation", "size", "units", "prune", "expected"),
    [
        ("logical", 8, 64, None, "b6b3afe600867218"),
        ("logical", 32, 300, None, "ae9704b97c858847"),
        ("sigmoid", 8, 64, None, "e351358d46e34055"),
        ("sigmoid", 32, 300, None, "7d291b46aefb5b51"),
        ("logical", 16, 200, 0.6, "1bba0e31a3b6f6e6"),
    ],
)
def test_the_searchs_draws_are_pinned(mutation, size, units, prune, expected):
    """Same seed, same candidates and population, release after release: a change that makes
    the DE cheaper must not change what it draws (the digests of random streams version 2: a
    stream per member and generation; a change of draws bumps ``STREAMS_VERSION`` and these)."""
    import hashlib

    from edrop_ray.config import Config
    from edrop_ray.files import pack_rows
    from edrop_ray.search import Search

    cfg = Config(population_size=size, seed=7, mutation=mutation, diversity_threshold=0.0,
                 patience=1000, target_prune_rate=prune)  # fmt: skip
    search = Search.from_config(cfg, units)
    weights = torch.linspace(0.5, 1.5, units, dtype=torch.float64)
    h = hashlib.sha256()
    for _ in range(4):
        candidates = search.propose()
        h.update(pack_rows(candidates).tobytes())
        search.select(candidates.double() @ weights / units)
    h.update(pack_rows(search.population.states).tobytes())
    assert h.hexdigest()[:16] == expected


@pytest.mark.parametrize("prune", [None, 0.6])
def test_any_process_proposes_any_members_the_same(prune):
    """A member's trial depends on the population alone: proposed alone, in a shard, or with
    every member, it is the same (the evaluators propose their own shards' trials)."""
    from edrop_ray.search import DEParams, Search

    search = Search(DEParams(population_size=12, seed=4, target_prune_rate=prune), 90)
    states = search.population.states
    whole = search.propose()[12:]
    for members in ([0], [11], range(3, 7), [9, 2, 5]):
        assert torch.equal(search.proposer.trials(states, members, 0), whole[list(members)])
    assert not torch.equal(search.proposer.trials(states, range(12), 1), whole)  # next one
