"""The public Python API for users who drive their own training loop.

:class:`EDropout` is the method as an ask/tell object over a user's own ``nn.Module``::

    ed = EDropout(model, example_inputs, population_size=16, seed=0)
    for step, (x, y) in enumerate(loader):
        if not ed.frozen:
            ed.tell(ed.energies(ed.propose(), x_energy, y_energy))  # or your own energies
        with ed.apply(model, ed.best):  # train the kept weights under the best state
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(); opt.zero_grad()
    slim = ed.slim()  # the physically slimmed network

Nothing here imports Ray. The search steps are the functional ones of
:mod:`edrop_ray.population`, wrapped by :class:`~edrop_ray.search.Search`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .budget import counter_for
from .energy import compute_energies
from .masking import Masker
from .search import DEParams, Search
from .slim import count_params_macs, slim_model
from .units import Units, discover_units

__all__ = ["EDropout", "DEParams"]


class EDropout:
    """EDropout's population search bound to one model.

    model: any ``nn.Module`` Torch-Pruning can trace; it keeps its weights and is never copied.
    example_inputs: one input batch (its shape is what matters), used to trace the units.
    **params: the keys of :class:`~edrop_ray.search.DEParams` (population_size, F, CR, mutation,
    p0, kappa, target_prune_rate, target_params, target_macs, macs_lambda, diversity_threshold,
    patience, max_generations, seed).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, **params: Any):
        unknown = set(params) - set(DEParams.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown EDropout setting(s) {sorted(unknown)}; "
                f"valid ones are {sorted(DEParams.__dataclass_fields__)}"
            )
        self.model = model
        self.example_inputs = example_inputs
        self.units: Units = discover_units(model, example_inputs)
        if self.units.num_units == 0:
            raise ValueError("the model has no prunable channel (no hidden conv/linear output)")
        self.params = DEParams(**params)
        counter = counter_for(self.params, model, self.units, example_inputs)  # budgets only
        self.search = Search(self.params, self.units.num_units, counter=counter)
        self.masker = Masker(model, self.units)

    @property
    def num_units(self) -> int:
        """D, the number of bits of a state."""
        return self.units.num_units

    @property
    def best(self) -> torch.Tensor:
        """(D,) bool: the lowest-energy member (the final mask once :attr:`frozen`)."""
        return self.search.best

    @property
    def frozen(self) -> bool:
        """True once the population converged: the best state is then the pruning mask."""
        return self.search.frozen

    @property
    def generation(self) -> int:
        return self.search.generation

    def propose(self) -> torch.Tensor:
        """The next generation's candidates: members then trials, (2S, D) bool. Judge them all
        on the same batch with the same weights and pass the energies to :meth:`tell`."""
        return self.search.propose()

    def tell(self, energies: torch.Tensor) -> dict[str, Any]:
        """Take the (2S,) energies of :meth:`propose`'s candidates (lower is better); returns
        the generation's record (best/mean energy, diversity, kept fraction, frozen)."""
        return self.search.select(torch.as_tensor(energies, dtype=torch.float32).cpu())

    @torch.no_grad()
    def energies(
        self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """The method's energy: mean cross-entropy of each state on (x, y), batched, BatchNorm
        in inference mode. states (N, D) bool; x, y one batch on the model's device. Keyword
        arguments go to :func:`edrop_ray.energy.compute_energies` (e.g. sparsity_lambda)."""
        return compute_energies(self.model, self.masker, states, x, y, **kwargs).cpu()

    @contextmanager
    def apply(self, model: nn.Module, state: torch.Tensor) -> Iterator[nn.Module]:
        """Within the block ``model`` runs with ``state`` applied: pruned channels output exactly
        zero and get zero gradient. ``model`` must be the model this object was built on."""
        if model is not self.model:
            raise ValueError("apply() takes the model this EDropout was built on")
        with self.masker.applied(state):
            yield model

    def slim(self, state: torch.Tensor | None = None) -> nn.Module:
        """A physically slimmed copy of the model without the units ``state`` drops (default:
        :attr:`best`); the model itself is untouched."""
        state = self.best if state is None else state
        return slim_model(self.model, self.units, state, self.example_inputs)

    def prune_rate(self, state: torch.Tensor | None = None) -> float:
        """1 - params(slimmed) / params(dense), counted on the physically slimmed model."""
        dense, _ = count_params_macs(self.model, self.example_inputs.cpu())
        slim, _ = count_params_macs(self.slim(state), self.example_inputs.cpu())
        return 1.0 - slim / dense

    def state_dict(self) -> dict[str, Any]:
        """The search's state (population, generator, convergence), for the user's checkpoint."""
        return self.search.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.search.load_state_dict(sd)

    def remove(self) -> None:
        """Remove the masking hooks: the model is exactly as it was before."""
        self.masker.remove()
