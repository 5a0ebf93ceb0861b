"""Population of binary pruning states and its binary differential evolution (torch only).

The search is functional, in the shape of an ask/tell optimiser: :func:`init_states` makes the
first population, :func:`ask` proposes one trial per member, the caller computes energies of
members and trials on the same batch with the same weights, and :func:`tell` keeps the better
of each pair. Every random draw comes from the ``torch.Generator`` the caller passes in, or from
one generator per member (a member's trial is then the same whichever process proposes it, and
whichever other members it proposes with), so a run is reproducible.

Shapes: ``S`` members, ``D`` units; states are ``(S, D)`` bool tensors (True = keep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "mutations",
    "register_mutation",
    "unregister_mutation",
    "Population",
    "init_states",
    "start",
    "ask",
    "uniform_rows",
    "repair",
    "tell",
    "diversity",
    "kept_fraction",
]


class Population(NamedTuple):
    """The search state that moves between generations (cheap to pickle).

    states:    (S, D) bool, the members.
    energies:  (S,) float, each member's energy from the last generation (inf before the first).
    best:      (D,) bool, the member of lowest energy after the last selection.
    best_energy: energy of ``best``.
    unchanged: generations for which ``best`` has not changed.
    generation: generations done.
    """

    states: torch.Tensor
    energies: torch.Tensor
    best: torch.Tensor
    best_energy: float
    unchanged: int
    generation: int


def init_states(
    *, size: int, num_units: int, p0: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw the first population: each bit keep=1 with probability ``p0``; member 0 all ones.

    Member 0 is the dense network, so the search can never start worse than no pruning.
    Returns ``(size, num_units)`` bool.
    """
    states = torch.rand(size, num_units, generator=generator) < p0
    states[0] = True
    return states


Generators = torch.Generator | Sequence[torch.Generator]


def uniform_rows(shape: torch.Size | tuple[int, ...], generator: Generators) -> torch.Tensor:
    """``torch.rand(shape)``, from one generator, or with row ``i`` from ``generator[i]`` (one
    stream per member: any process draws any member's numbers)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    out = torch.empty(shape)
    for row, g in zip(out, generator, strict=True):
        torch.rand(row.shape, generator=g, out=row)
    return out


MutationFn = Callable[..., torch.Tensor]
_MUTATIONS: dict[str, MutationFn] = {}


def register_mutation(name: str) -> Callable[[MutationFn], MutationFn]:
    """Decorator: make ``fn(s_a, s_b, s_c, *, F, kappa, generator) -> mutant`` the mutation
    operator called ``name`` (``--set mutation=name``). :func:`ask` calls it once per member,
    with the three parents' rows as (1, D) bool and that member's generator (draw only from it:
    then the member's trial is the same whichever process proposes it). An operator that
    proposes on a Ray cluster must be registered in the evaluators' processes too (imported
    with the model, say)."""

    def register(fn: MutationFn) -> MutationFn:
        _MUTATIONS[name] = fn
        return fn

    return register


def unregister_mutation(name: str) -> None:
    """Forget the mutation operator called ``name`` (a test's or a notebook's own)."""
    _MUTATIONS.pop(name)


def mutations() -> tuple[str, ...]:
    """Names of the registered mutation operators."""
    return tuple(_MUTATIONS)


@register_mutation("logical")
def mutate_logical(s_a, s_b, s_c, *, F: float, kappa: float, generator) -> torch.Tensor:
    """Where ``u < F`` and ``s_b OR s_c``, the mutant bit is ``NOT s_a``, else ``s_a``."""
    flip = (torch.rand(s_a.shape, generator=generator) < F) & (s_b | s_c)
    return s_a ^ flip


@register_mutation("sigmoid")
def mutate_sigmoid(s_a, s_b, s_c, *, F: float, kappa: float, generator) -> torch.Tensor:
    """``v = s_a + F (s_b - s_c)``; bit = 1 with probability ``sigmoid(kappa (v - 0.5))``."""
    v = s_a.float() + F * (s_b.float() - s_c.float())
    prob = torch.sigmoid(kappa * (v - 0.5))
    return torch.rand(s_a.shape, generator=generator) < prob


def ask(
    states: torch.Tensor,
    *,
    F: float,
    CR: float,
    mutation: str = "logical",
    kappa: float = 10.0,
    generator: Generators,
    members: Sequence[int] | None = None,
) -> torch.Tensor:
    """Propose one trial state per member by binary DE: mutation then binomial crossover.

    ``mutation`` names a registered operator (:func:`mutations`; "logical" and "sigmoid" are
    built in). For each member, in turn: three distinct parents a, b, c drawn from the whole
    population (they may include the member itself, as the authors' public code allows), the
    mutant of their rows, then crossover: each trial bit comes from the mutant with probability
    ``CR``, else from the member.

    members: which members to propose for (default: all, in order). generator: one generator the
    members draw from in turn, or one per member asked (:meth:`edrop_ray.search.Proposer.trials`
    gives each member a stream of its own, so any process proposes any subset of the members
    and gets the same trials).

    states: (S, D) bool. Returns trials (len(members), D) bool.
    """
    size, num_units = states.shape
    if size < 4:
        raise ValueError(f"population needs at least 4 members for DE, got {size}")
    if mutation not in _MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}; choose one of {mutations()}")
    members = range(size) if members is None else members
    if isinstance(generator, torch.Generator):
        generator = [generator] * len(members)
    elif len(generator) != len(members):
        raise ValueError(f"{len(generator)} generators for {len(members)} members")
    operator = _MUTATIONS[mutation]
    trials = torch.empty(len(members), num_units, dtype=torch.bool)
    for k, (i, g) in enumerate(zip(members, generator, strict=True)):
        # the first three of a random permutation of the members
        s_a, s_b, s_c = states[torch.randperm(size, generator=g)[:3]].split(1)
        mutant = operator(s_a, s_b, s_c, F=F, kappa=kappa, generator=g)
        take_mutant = torch.rand(1, num_units, generator=g) < CR
        member = states[i : i + 1]
        # where(take_mutant, mutant, member) on bits
        trials[k] = (member ^ ((member ^ mutant) & take_mutant))[0]
    return trials


def repair(states: torch.Tensor, *, max_kept: int, generator: Generators) -> torch.Tensor:
    """Switch off random kept units of every state that keeps more than ``max_kept`` units.

    This is the hard budget of ``target_prune_rate``. states: (S, D) bool; returns a new tensor.
    generator: one, or one per state (:func:`uniform_rows`); only the states over the budget
    draw, so what a state draws never depends on the others.
    """
    over = (states.sum(dim=1) > max_kept).nonzero().flatten()
    if over.numel() == 0:
        return states
    sub = states[over]
    if not isinstance(generator, torch.Generator):
        generator = [generator[i] for i in over.tolist()]
    # Random priority for every kept bit; keep the max_kept kept bits of highest priority.
    priority = uniform_rows(sub.shape, generator)
    priority = torch.where(sub, priority, torch.full_like(priority, -1.0))
    order = priority.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(sub.shape[1]).expand_as(order).contiguous())
    out = states.clone()
    out[over] = sub & (rank < max_kept)
    return out


def tell(
    population: Population,
    trials: torch.Tensor,
    member_energies: torch.Tensor,
    trial_energies: torch.Tensor,
) -> Population:
    """Greedy selection: a trial replaces its member when its energy is lower or equal.

    Members and trials must have been judged on the same batch with the same weights.
    trials: (S, D) bool; member_energies, trial_energies: (S,) float.
    """
    replace = trial_energies <= member_energies
    states = population.states.clone()  # copy only the rows replaced (not a where over S x D)
    states[replace] = trials[replace]
    energies = torch.where(replace, trial_energies, member_energies)
    i = int(torch.argmin(energies))
    best = states[i].clone()
    unchanged = population.unchanged + 1 if torch.equal(best, population.best) else 0
    return Population(
        states=states,
        energies=energies,
        best=best,
        best_energy=float(energies[i]),
        unchanged=unchanged,
        generation=population.generation + 1,
    )


def diversity(states: torch.Tensor) -> float:
    """Mean pairwise Hamming distance over D, in [0, ~0.5]: 0 when every member is the same.

    Computed from per-bit counts in O(S D): for one bit kept by k of S members the number of
    differing ordered pairs is 2 k (S - k).
    """
    size, num_units = states.shape
    # column sums of bytes, 255 rows at a time in uint8 (they cannot overflow), added up in
    # int32: a 30th of the time of one int32 sum over the rows (1.4 ms at S = 1024, D = 11,456)
    kept = torch.zeros(num_units, dtype=torch.int32)
    for rows in states.view(torch.uint8).split(255):
        kept += rows.sum(dim=0, dtype=torch.uint8)
    kept = kept.double()
    pairs = size * (size - 1)
    return float((2 * kept * (size - kept)).sum() / (pairs * num_units))


def kept_fraction(states: torch.Tensor) -> torch.Tensor:
    """Fraction of kept units per state: (S, D) -> (S,) float (or (D,) -> scalar)."""
    return states.float().mean(dim=-1)


def start(states: torch.Tensor) -> Population:
    """Wrap freshly drawn states as a population that has not been judged yet."""
    return Population(
        states=states,
        energies=torch.full((states.shape[0],), float("inf")),
        best=states[0].clone(),
        best_energy=float("inf"),
        unchanged=0,
        generation=0,
    )
