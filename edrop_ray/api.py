"""The public Python API: :func:`prune` a user's own network, or drive EDropout from a loop.

:func:`prune` runs the whole method on a user's ``nn.Module`` and ``Dataset`` through the run
path of ``edrop-ray prune`` (dense baseline, EDropout, slimming, report)::

    result = edrop_ray.prune(model, train_set, test_set, epochs=5, target_params=0.5)
    result.model            # the physically slimmed network, eval mode
    result.report           # what report.json holds

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

Nothing here imports Ray (:func:`prune` with ``backend="ray"`` does, when it runs). The search
steps are the functional ones of :mod:`edrop_ray.population`, wrapped by
:class:`~edrop_ray.search.Search`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import job, store
from .api_checks import as_dataset, check_model_and_data, input_size_of
from .budget import counter_for
from .config import Config, _check_keys, _coerce, config_to_dict, read_yaml, validate
from .energy import compute_energies
from .errors import RunInterrupted, UserError
from .masking import Masker
from .search import DEParams, Search
from .slim import count_params_macs, slim_model
from .units import Units, discover_units

__all__ = ["EDropout", "DEParams", "prune", "PruneResult"]


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


# --- prune(): the whole method on a user's own network and data -------------------------------

# Config keys that name the grid's data and model; prune() takes both as arguments instead.
_GRID_KEYS = ("dataset", "data_root", "download", "input_size", "model", "small_input")


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    model: the physically slimmed network (a copy; on the CPU, in eval mode, ready to use).
    mask: (D,) bool over the units, True = kept (the final pruning state).
    kept_per_layer: kept fraction of each coupled group, keyed by its root layer's name.
    report: the dict ``edrop-ray prune`` writes to report.json (Top-1/Top-5 dense and pruned,
        params and MACs before and after, prune_rate, budgets, generations, ...).
    run_dir: the run folder when ``out`` was given, else None.
    """

    model: nn.Module
    mask: torch.Tensor
    kept_per_layer: dict[str, float]
    report: dict[str, Any]
    run_dir: Path | None


def prune(
    model: nn.Module,
    train_set: Dataset | DataLoader,
    test_set: Dataset | DataLoader,
    *,
    example_inputs: torch.Tensor | None = None,
    config: Config | Mapping[str, Any] | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` with EDropout on ``train_set``; measure it on ``test_set``.

    The run is the one of ``edrop-ray prune`` (same loop, checkpoints, report), on your own
    network and data instead of the grid's, in process (``backend="local"``, the default here)
    or on Ray (``backend="ray"``: the module, pickled with its weights, and the training set go
    to the object store once; every actor builds its copy from there, so the workers must be
    able to unpickle them: a class defined in your script travels by value, one from a package
    must be importable on the workers):

    1. the dense baseline: a copy of ``model`` trained dense for the same budget;
    2. EDropout: another copy, from the same weights, trained under the population's best state
       until the population converges, then fine-tuned with that mask frozen;
    3. the physically slimmed model, its Top-1/Top-5, parameters and MACs.

    model: any ``nn.Module`` that Torch-Pruning can trace and that maps a batch of inputs to
        (batch, classes) logits. Training starts from the weights it holds (a trained model is
        pruned and fine-tuned; a fresh one is trained from scratch). It is never modified: the
        run trains copies. It may be on any device; the run uses ``device`` (default auto).
    train_set, test_set: map-style ``Dataset``s whose items are ``(input, label)``: ``input`` a
        tensor of one fixed shape, ``label`` an integer class in [0, classes). A ``DataLoader``
        is accepted for its ``.dataset`` and ``batch_size`` (the train loader's sets
        ``batch_size``, the test loader's ``eval_batch_size``, unless given as settings); its
        sampler, shuffling, workers and collate_fn are not used: the run draws its own seeded
        batches.
    example_inputs: one input batch (B, ...) to trace the model on; default: zeros shaped like
        two training inputs. The number of classes is the size of the model's output on it.
    config: run settings as a :class:`~edrop_ray.config.Config`, a mapping, or the path of a
        YAML config file; ``**overrides`` are settings by name (``epochs=5``,
        ``target_params=0.5``, ``population_size=16``, ...) and win over ``config``. Unless
        either sets ``backend``, it is ``"local"``; the keys that name the grid's data and model
        (dataset, data_root, download, input_size, model, small_input) do not apply.
    out: write the run folder of ``edrop-ray prune`` there (report.json, mask.pt,
        pruned_model.pt, history.parquet, plots; reload the model with
        ``edrop_ray.slim.load_pruned(path, model=<a new instance>)``). A run already there is
        replaced only with ``overwrite``, and only once the new one is complete. None: nothing
        is kept on disk.
    quiet: no progress bar and no summary table.

    Raises TypeError or ValueError, with a one-line message and before anything is written, for
    bad input: settings, an ``out`` folder in the way, a model that cannot be traced or slimmed
    or has nothing to prune, data of the wrong shape or with labels outside [0, classes), a
    budget no state can meet. A run that fails on its way (a diverging loss) raises
    :class:`~edrop_ray.errors.UserError`.
    """
    cfg, given = _prune_config(config, overrides)
    train_set, train_batch = as_dataset(train_set, "train_set")
    test_set, test_batch = as_dataset(test_set, "test_set")
    loader_sizes = {"batch_size": train_batch, "eval_batch_size": test_batch}
    cfg = dataclasses.replace(
        cfg, **{k: v for k, v in loader_sizes.items() if v is not None and k not in given}
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        validate(cfg, names=False)
        if out is not None:
            store.check_out(out, overwrite=overwrite, flag="out")
        own, data, units = check_model_and_data(model, train_set, test_set, example_inputs)
        cfg = dataclasses.replace(
            cfg,
            model=f"custom:{type(model).__qualname__}",
            dataset=f"custom:{type(train_set).__qualname__}",
            **input_size_of(own.example),
        )
        job.check_inputs(cfg, data, names=False)
        # a budget no state can meet is refused now, not after the dense baseline
        Search.from_config(
            cfg, units.num_units, counter=counter_for(cfg, own.module, units, own.example)
        )
    except UserError as e:
        raise ValueError(str(e)) from None

    with tempfile.TemporaryDirectory(prefix="edrop-prune-") as tmp:
        target = Path(tmp) / "run" if out is None else Path(out).expanduser()
        try:
            outcome = job.run_new(cfg, target, overwrite=overwrite, quiet=quiet, data=data, own=own)
        except RunInterrupted:
            if out is None:  # its folder was temporary
                raise KeyboardInterrupt from None
            raise
    return PruneResult(
        model=outcome.model.eval(),
        mask=outcome.mask,
        kept_per_layer=dict(outcome.report["kept_per_layer"]),
        report=outcome.report,
        run_dir=None if out is None else target,
    )


def _prune_config(config: Any, overrides: dict[str, Any]) -> tuple[Config, set[str]]:
    """The run's Config and the keys the caller set (a Config's fields count where they differ
    from the defaults). TypeError for an unknown key, ValueError for a value that does not fit."""
    if isinstance(config, Config):
        defaults = Config()
        values = {k: v for k, v in config_to_dict(config).items() if getattr(defaults, k) != v}
    elif config is None:
        values = {}
    elif isinstance(config, str | os.PathLike | Mapping):
        source = "config"
        if not isinstance(config, Mapping):
            source = str(config)
            try:
                config = read_yaml(Path(config), "config", "config") or {}
            except UserError as e:
                raise ValueError(str(e)) from None
            if not isinstance(config, Mapping):
                raise ValueError(f"config file {source!r} must hold a mapping of key: value")
        try:
            _check_keys(dict(config), source)
        except UserError as e:
            raise TypeError(str(e)) from None
        values = dict(config)
    else:
        raise TypeError(
            f"config must be a Config, a mapping or a YAML file's path, got {type(config).__name__}"
        )
    grid = sorted(set(overrides) & set(_GRID_KEYS))
    if grid:
        raise TypeError(
            f"prune() takes the model and the data as arguments; {grid[0]}= does not apply"
        )
    unknown = sorted(set(overrides) - set(Config.__dataclass_fields__))
    if unknown:
        raise TypeError(
            f"unknown prune() setting {unknown[0]!r}; valid ones: "
            + ", ".join(k for k in Config.__dataclass_fields__ if k not in _GRID_KEYS)
        )
    values.update(overrides)
    values = {k: v for k, v in values.items() if k not in _GRID_KEYS}
    try:
        coerced = {k: _coerce(k, v) for k, v in values.items()}
    except UserError as e:
        raise ValueError(str(e)) from None
    return Config(**{"backend": "local", **coerced}), set(values)
