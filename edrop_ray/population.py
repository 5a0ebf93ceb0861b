"""Population of binary pruning states and its binary differential evolution (torch only).

The search is functional, in the shape of an ask/tell optimiser: :func:`init_states` makes the
first population, :func:`ask` proposes one trial per member, the caller computes energies of
members and trials on the same batch with the same weights, and :func:`tell` keeps the better
of each pair. Every random draw comes from the one ``torch.Generator`` the caller passes in, so a
run is reproducible and its state can be checkpointed with ``generator.get_state()``.

Shapes: ``S`` members, ``D`` units; states are ``(S, D)`` bool tensors (True = keep).
"""

from __future__ import annotations

from collections.abc import Callable
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


def _pick_parents(size: int, generator: torch.Generator) -> torch.Tensor:
    """For each member, three distinct indices a, b, c (they may include the member itself,
    as the authors' public code allows). Returns ``(size, 3)`` long."""
    # The first three of a random permutation per row (argsort of uniform noise), vectorised
    # over members: the three smallest of each row, in order, which topk finds in O(S) per row
    # instead of sorting all S (the same indices: the draws have no ties in practice).
    noise = torch.rand(size, size, generator=generator)
    return noise.topk(3, dim=1, largest=False, sorted=True).indices


_DRAW_ROWS = 64  # rows of uniforms drawn at a time by _draw_below


def _draw_below(p: float | torch.Tensor, shape: torch.Size, generator) -> torch.Tensor:
    """``torch.rand(shape, generator=generator) < p`` (``p`` a number, or a tensor of ``shape``),
    drawn a block of rows at a time: the same numbers in the same order (torch draws CPU
    uniforms one after the other), without a float32 copy of the whole (S, D) to allocate and
    fault in: about a third less time per draw at S = 1024, D = 11,456."""
    out = torch.empty(shape, dtype=torch.bool)
    for start in range(0, shape[0], _DRAW_ROWS):
        rows = slice(start, min(start + _DRAW_ROWS, shape[0]))
        u = torch.rand((rows.stop - start, *shape[1:]), generator=generator)
        torch.lt(u, p[rows] if torch.is_tensor(p) else p, out=out[rows])
    return out


MutationFn = Callable[..., torch.Tensor]
_MUTATIONS: dict[str, MutationFn] = {}


def register_mutation(name: str) -> Callable[[MutationFn], MutationFn]:
    """Decorator: make ``fn(s_a, s_b, s_c, *, F, kappa, generator) -> mutant`` the mutation
    operator called ``name`` (``--set mutation=name``). All states are (S, D) bool."""

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
    flip = _draw_below(F, s_a.shape, generator) & (s_b | s_c)
    return s_a ^ flip


@register_mutation("sigmoid")
def mutate_sigmoid(s_a, s_b, s_c, *, F: float, kappa: float, generator) -> torch.Tensor:
    """``v = s_a + F (s_b - s_c)``; bit = 1 with probability ``sigmoid(kappa (v - 0.5))``."""
    v = s_a.float() + F * (s_b.float() - s_c.float())
    prob = torch.sigmoid(kappa * (v - 0.5))
    return _draw_below(prob, s_a.shape, generator)


def ask(
    states: torch.Tensor,
    *,
    F: float,
    CR: float,
    mutation: str = "logical",
    kappa: float = 10.0,
    generator: torch.Generator,
) -> torch.Tensor:
    """Propose one trial state per member by binary DE: mutation then binomial crossover.

    ``mutation`` names a registered operator (:func:`mutations`; "logical" and "sigmoid" are
    built in). Crossover: each trial bit comes from the mutant with probability ``CR``, else from
    the member.

    states: (S, D) bool. Returns trials (S, D) bool.
    """
    size, num_units = states.shape
    if size < 4:
        raise ValueError(f"population needs at least 4 members for DE, got {size}")
    if mutation not in _MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}; choose one of {mutations()}")
    parents = _pick_parents(size, generator)
    s_a, s_b, s_c = (states[parents[:, k]] for k in range(3))
    mutant = _MUTATIONS[mutation](s_a, s_b, s_c, F=F, kappa=kappa, generator=generator)
    take_mutant = _draw_below(CR, states.shape, generator)
    # where(take_mutant, mutant, states) on bits: a third of its time on (S, D) bool
    return states ^ ((states ^ mutant) & take_mutant)


def repair(states: torch.Tensor, *, max_kept: int, generator: torch.Generator) -> torch.Tensor:
    """Switch off random kept units of every state that keeps more than ``max_kept`` units.

    This is the hard budget of ``target_prune_rate``. states: (S, D) bool; returns a new tensor.
    """
    kept = states.sum(dim=1)
    if bool((kept <= max_kept).all()):
        return states
    # Random priority for every kept bit; keep the max_kept kept bits of highest priority.
    priority = torch.rand(states.shape, generator=generator)
    priority = torch.where(states, priority, torch.full_like(priority, -1.0))
    order = priority.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(states.shape[1]).expand_as(order).contiguous())
    return states & (rank < max_kept)


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
    # column sums of bytes in int32: half the time of a bool sum (S <= 2^31 members)
    kept = states.view(torch.uint8).sum(dim=0, dtype=torch.int32).double()
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
