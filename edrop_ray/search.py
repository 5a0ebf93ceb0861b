"""The EDropout search as one stateful object: propose candidates, take energies, converge.

:class:`Search` wraps the functional population steps of :mod:`edrop_ray.population` with the
run's hyper-parameters, its seeded generator and the convergence rule. It never touches a model:
whoever owns the weights computes the energies of :meth:`Search.propose`'s candidates and hands
them to :meth:`Search.select`. The in-process loop and the Ray coordinator both drive it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import population as pop
from .budget import Counter, repair_budget
from .energy import macs_penalty
from .errors import UserError
from .seeds import stream, stream_seeds

if TYPE_CHECKING:  # a Config is only read field by field: no import of the config module
    from .config import Config

__all__ = ["DEParams", "Proposer", "Search"]


@dataclass(frozen=True)
class DEParams:
    """The search's own settings: the population, its DE operators, budget and convergence.

    A test or a user's own loop builds one in a line (``DEParams(population_size=8)``);
    :meth:`from_config` takes them from a run's :class:`~edrop_ray.config.Config`.
    """

    population_size: int = 8
    p0: float = 0.5
    mutation: str = "logical"
    F: float = 0.9
    CR: float = 0.7
    kappa: float = 10.0
    target_prune_rate: float | None = None  # hard budget on the kept-unit fraction
    target_params: float | None = None  # hard budget: kept fraction of the dense parameters
    target_macs: float | None = None  # hard budget: kept fraction of the dense MACs
    macs_lambda: float = 0.0  # energy penalty on the kept MACs fraction
    diversity_threshold: float = 0.02
    patience: int = 10
    max_generations: int = 0  # 0 = no cap
    seed: int = 0
    probe_members: int = 0  # diagnostics: fixed random states judged beside the population

    @classmethod
    def from_config(cls, cfg: Config) -> DEParams:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Proposer:
    """The rule that makes a generation's trials: the DE operators and the budgets (plain values
    and tensors: it pickles cheaply to the processes that judge, which propose their own
    members' trials where the population is large).

    Member ``i``'s trial in generation ``g`` draws everything (parents, mutation, crossover,
    repairs) from stream ``("trial", g)``'s ``i``-th seed (:func:`edrop_ray.seeds.stream_seeds`):
    it depends on the population and on nothing else, so any process proposes any members and
    gets the trials the whole population's proposal holds.
    """

    params: DEParams
    num_units: int
    max_kept: int
    max_params: int | None = None
    max_macs: int | None = None
    counter: Counter | None = None

    def trials(self, states: torch.Tensor, members: Sequence[int], generation: int) -> torch.Tensor:
        """(len(members), D) bool: the trials of ``members`` of the population ``states``
        ((S, D) bool) in generation ``generation`` (the generations done before it)."""
        cfg = self.params
        seeds = stream_seeds(cfg.seed, "trial", generation, count=states.shape[0])
        generators = [torch.Generator().manual_seed(seeds[i]) for i in members]
        trials = pop.ask(
            states,
            F=cfg.F,
            CR=cfg.CR,
            mutation=cfg.mutation,
            kappa=cfg.kappa,
            generator=generators,
            members=members,
        )
        return self.repair(trials, generators)

    def candidates(
        self, states: torch.Tensor, members: range, generation: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What is judged of ``members`` (a range of the population) in ``generation``: the
        members then their trials, (2 len(members), D) bool, and the trials alone. The whole
        population's is :meth:`Search.propose`'s; an evaluator judges its shard's."""
        trials = self.trials(states, members, generation)
        return torch.cat([states[members.start : members.stop], trials]), trials

    def repair(self, states: torch.Tensor, generator: pop.Generators) -> torch.Tensor:
        """``states`` within the budgets: the kept-unit cap (``target_prune_rate``), then the
        parameter and MAC budgets; ``generator``: one, or one per state."""
        if self.max_kept < self.num_units:
            states = pop.repair(states, max_kept=self.max_kept, generator=generator)
        if self.max_params is None and self.max_macs is None:
            return states
        return repair_budget(
            states,
            self.counter,
            max_params=self.max_params,
            max_macs=self.max_macs,
            generator=generator,
        )


class Search:
    """Population, generator and convergence state of one EDropout run.

    counter: the exact params/MACs count of the model's states (:func:`edrop_ray.budget.
    build_counter`); needed for ``target_params``, ``target_macs`` and ``macs_lambda``.
    """

    def __init__(self, params: DEParams, num_units: int, *, counter: Counter | None = None):
        cfg = params
        self.params = cfg
        self.num_units = num_units
        self.counter = counter
        max_params, max_macs = _budgets(cfg, counter, num_units)
        self.generator = stream(cfg.seed, "population")
        states = pop.init_states(
            size=cfg.population_size, num_units=num_units, p0=cfg.p0, generator=self.generator
        )
        max_kept = num_units
        if cfg.target_prune_rate is not None:
            # at least one unit stays on: an all-off network has no signal to learn from
            max_kept = max(1, math.floor((1.0 - cfg.target_prune_rate) * num_units))
        # the budgets live in the proposer, which every process that proposes gets
        self.proposer = Proposer(cfg, num_units, max_kept, max_params, max_macs, counter)
        self.population = pop.start(self.proposer.repair(states, self.generator))
        self.probes = self._probes()
        self.frozen = False
        self.converged_at: int | None = None
        self._trials: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Config, num_units: int, *, counter: Counter | None = None) -> Search:
        """The search of a run: :class:`DEParams` taken from the run's config."""
        return cls(DEParams.from_config(cfg), num_units, counter=counter)

    @property
    def best(self) -> torch.Tensor:
        """(D,) bool: the state training uses now (the final mask once frozen)."""
        return self.population.best

    @property
    def generation(self) -> int:
        return self.population.generation

    @property
    def max_kept(self) -> int:
        """The most units a state may keep (``target_prune_rate``; D without it)."""
        return self.proposer.max_kept

    @property
    def max_params(self) -> int | None:
        return self.proposer.max_params

    @property
    def max_macs(self) -> int | None:
        return self.proposer.max_macs

    def propose(self) -> torch.Tensor:
        """Members then trials of the next generation: (2S, D) bool, to be judged together.

        It draws nothing from the search's generator (each member's trial has a stream of its
        own: :class:`Proposer`), so proposing ahead, or again, changes nothing.
        """
        states = self.population.states
        candidates, self._trials = self.proposer.candidates(
            states, range(states.shape[0]), self.generation
        )
        return candidates

    def take_trials(self, trials: torch.Tensor) -> None:
        """Take the next generation's trials proposed elsewhere (by the processes that judged
        them, with :attr:`proposer`), in place of :meth:`propose`: :meth:`select` follows."""
        shape = (self.params.population_size, self.num_units)
        if trials.shape != shape or trials.dtype != torch.bool:
            raise ValueError(
                f"expected {shape} bool trials, got {tuple(trials.shape)} {trials.dtype}"
            )
        self._trials = trials

    def select(self, energies: torch.Tensor) -> dict[str, Any]:
        """Take the (2S,) energies of :meth:`propose`'s candidates; selection and convergence.

        Returns this generation's record: best/mean/median energy, the gap median - best, diversity,
        kept fraction, bits of the best state that changed, frozen.
        """
        if self._trials is None:
            raise RuntimeError("select() called without propose()")
        size = self.params.population_size
        cfg = self.params
        if energies.shape != (2 * size,):
            raise ValueError(f"expected {2 * size} energies, got {tuple(energies.shape)}")
        if not bool(torch.isfinite(energies).all()):
            raise UserError(
                f"an energy became {float(energies[~torch.isfinite(energies)][0])} at generation "
                f"{self.generation}: the weights diverged; lower the learning rate (--set lr=...)"
            )
        previous_best = self.population.best
        if cfg.macs_lambda:
            candidates = torch.cat([self.population.states, self._trials])
            energies = energies + macs_penalty(candidates, self.counter, cfg.macs_lambda)
        self.population = pop.tell(self.population, self._trials, energies[:size], energies[size:])
        self._trials = None
        median = float(self.population.energies.median())
        div = pop.diversity(self.population.states)
        cfg = self.params
        if div < cfg.diversity_threshold or self.population.unchanged >= cfg.patience:
            self.frozen = True
            self.converged_at = self.population.generation
        if cfg.max_generations and self.population.generation >= cfg.max_generations:
            self.frozen = True
        return {
            "generation": self.population.generation,
            "best_energy": self.population.best_energy,
            "mean_energy": float(self.population.energies.mean()),
            "diversity": div,
            "kept_fraction": float(self.best.float().mean()),
            "frozen": self.frozen,
            # dynamics: how far the best state moved, and how much better than the typical
            # member it is under the same weights and batch (members are re-judged each generation)
            "best_changed_bits": int((self.best != previous_best).sum()),
            "median_energy": median,
            "energy_gap": median - self.population.best_energy,
        }

    def _probes(self) -> torch.Tensor | None:
        """(K, D) bool: ``probe_members`` random states drawn once from their own stream (p0, and
        the same budgets as the population), so the search draws exactly what it draws without
        them. They never evolve and training never uses them: judged on the weights of each
        generation, they show how a mask the network was not trained under fares."""
        cfg = self.params
        if not cfg.probe_members:
            return None
        g = stream(cfg.seed, "probe")
        probes = pop.init_states(
            size=cfg.probe_members, num_units=self.num_units, p0=cfg.p0, generator=g
        )
        return self.proposer.repair(probes, g)

    def sample_member(self, generator: torch.Generator) -> torch.Tensor:
        """(D,) bool: a member drawn with probability ``softmax(-z)``, z its standardised energy
        (``train_state: sampled``: training samples sub-networks, as dropout does, until the
        freeze). Before the first generation, and once frozen, it is the best state."""
        energies = self.population.energies
        if self.frozen or not bool(torch.isfinite(energies).all()):
            return self.best
        z = (energies - energies.mean()) / energies.std().clamp_min(1e-8)
        i = int(torch.multinomial(torch.softmax(-z, dim=0), 1, generator=generator))
        return self.population.states[i]

    def run_generation(self, learner) -> dict[str, Any]:
        """One whole generation judged by ``learner`` (anything with ``energy_batch()`` and
        ``energies(states, x, y)``, e.g. :class:`edrop_ray.learner.Learner`)."""
        x, y = learner.energy_batch()
        record = self.select(learner.energies(self.propose(), x, y))
        if self.probes is not None:  # a pass of their own: the population's energies unchanged
            energies = learner.energies(self.probes, x, y)
            if self.params.macs_lambda:  # as select() adds it to the population's energies
                energies = energies + macs_penalty(
                    self.probes, self.counter, self.params.macs_lambda
                )
            probe = float(energies.mean())
            record["probe_energy"] = probe
            record["probe_gap"] = probe - record["best_energy"]
        return record

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the search exactly (tensors and plain values only).

        A proposal under way is not in it: a resumed search proposes it again, the same.
        """
        p = self.population
        return {
            "states": p.states.clone(),
            "energies": p.energies.clone(),
            "best": p.best.clone(),
            "best_energy": p.best_energy,
            "unchanged": p.unchanged,
            "generation": p.generation,
            "generator": self.generator.get_state(),
            "frozen": self.frozen,
            "converged_at": -1 if self.converged_at is None else self.converged_at,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.population = pop.Population(
            states=sd["states"],
            energies=sd["energies"],
            best=sd["best"],
            best_energy=float(sd["best_energy"]),
            unchanged=int(sd["unchanged"]),
            generation=int(sd["generation"]),
        )
        self.generator.set_state(sd["generator"])
        self.frozen = bool(sd["frozen"])
        self.converged_at = None if int(sd["converged_at"]) < 0 else int(sd["converged_at"])
        self._trials = None


def _budgets(
    cfg: DEParams, counter: Counter | None, num_units: int
) -> tuple[int | None, int | None]:
    """(max params, max MACs) of the hard budgets; a budget no state can meet is refused."""
    if cfg.target_params is None and cfg.target_macs is None and not cfg.macs_lambda:
        return None, None
    if counter is None or counter.num_units != num_units:
        raise ValueError("target_params, target_macs and macs_lambda need the model's counter")
    low_params, low_macs = (int(v[0]) for v in counter.count(torch.zeros(1, num_units).bool()))
    out: list[int | None] = []
    for target, dense, low, what in (
        (cfg.target_params, counter.dense_params, low_params, "params"),
        (cfg.target_macs, counter.dense_macs, low_macs, "macs"),
    ):
        if target is None:
            out.append(None)
            continue
        limit = math.floor(target * dense)
        if low > limit:
            raise UserError(
                f"target_{what}={target} cannot be met: the smallest slimmed model keeps "
                f"{low / dense:.4f} of the dense {what}; ask for at least that"
            )
        out.append(limit)
    return out[0], out[1]
