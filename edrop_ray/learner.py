"""One run's model, optimiser, masking hooks and seeded data order: :class:`Learner`.

The model is built from the config's name with seeded weights, or is a user's own network
(:class:`OwnModel`). Everything that can make a run differ (data order, energy batches, dropout)
comes from a named stream of the one seed (:mod:`edrop_ray.seeds`), and the generators' state is
in :meth:`Learner.state_dict`, so a resumed run ends where an uninterrupted one does.
:mod:`edrop_ray.loop` alternates a learner with the search.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset, default_collate

from .config import Config
from .dataset_info import DataInfo
from .devices import resolve_device  # re-exported: the CLI, job and compare import it here
from .energy import compute_energies
from .errors import UserError
from .models import Replica, build_replica, replica_of, skeleton
from .seeds import stream, stream_seed
from .train import build_optimizer, build_scheduler, evaluate, train_step
from .units import Units

__all__ = [
    "Learner",
    "OwnModel",
    "new_learner",
    "resolve_device",
    "fetch_batch",
    "test_batches",
    "split_heldout",
]


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _on_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def fetch_batch(dataset: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``idx`` of ``dataset`` as one (x, y) batch."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # in-memory TensorDataset: index all at once
        return tensors[0][idx], tensors[1][idx]
    return default_collate([dataset[int(i)] for i in idx])


def test_batches(dataset: Dataset, batch_size: int):
    """The test set in order, in batches."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield fetch_batch(dataset, torch.arange(start, min(start + batch_size, n)))


def split_heldout(cfg: Config, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(training part, held-out part): sorted sample indexes of a training set of ``n``, or
    (None, None) with ``energy_source: train`` (every sample is both). The held-out part is the
    first ``floor(heldout_fraction * n)`` of a permutation from the ``heldout_split`` stream: the
    same for every run of a seed, whatever else the config says."""
    if cfg.energy_source == "train":
        return None, None
    held = math.floor(cfg.heldout_fraction * n)
    if held < 1 or n - held < cfg.batch_size:
        raise UserError(
            f"heldout_fraction {cfg.heldout_fraction:g} of the {n} training samples leaves "
            f"{held} for the energy batches and {n - held} for training (batch_size "
            f"{cfg.batch_size}); both must be filled: change --set heldout_fraction"
        )
    order = torch.randperm(n, generator=stream(cfg.seed, "heldout_split"))
    return order[held:].sort().values, order[:held].sort().values


class Learner:
    """Model, optimiser, masking hooks and the seeded data order of one run.

    The model is built from ``cfg.model`` with seeded weights, or is ``model`` (a user's own
    network, trained from the weights it holds; this learner trains it in place) with
    ``example_inputs``, one CPU batch on which its units are traced. ``optimizer`` replaces the
    one built from the config (a given one keeps its own lr: no schedule); ``masked=False``
    trains ``model`` as it is (no units, no masker: e.g. a physically slimmed model);
    ``start_step`` is the step of the budget it starts at; ``units``: the model's units when
    another process traced them already (:func:`~edrop_ray.models.replica_of`).
    """

    def __init__(
        self,
        cfg: Config,
        train_set: Dataset,
        info: DataInfo,
        device: torch.device,
        *,
        model: nn.Module | None = None,
        example_inputs: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        masked: bool = True,
        start_step: int = 0,
        units: Units | None = None,
    ):
        self.cfg = cfg
        self.train_set = train_set
        self.info = info
        self.device = device
        if model is None:
            torch.manual_seed(stream_seed(cfg.seed, "init"))  # the weights' initialisation
            replica = build_replica(cfg, info, device, units)
        elif not masked:  # e.g. a physically slimmed model: nothing to trace, nothing to mask
            fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
            replica = Replica(model.to(device=device, memory_format=fmt), None, None,
                              example_inputs, fmt)  # fmt: skip
        else:
            if example_inputs is None:
                raise ValueError("a Learner given a model needs its example_inputs")
            replica = replica_of(model, example_inputs, cfg, device, units)
        self.model, self.units = replica.model, replica.units
        self.masker = replica.masker if masked else None  # unmasked: every step trains dense
        self.example, self.memory_format = replica.example, replica.memory_format
        # Dropout (AlexNet, SqueezeNet) draws from torch's global generator. The learner keeps
        # that generator's state as its own, swaps it in around each training step and saves it
        # in checkpoints, so a resumed run draws the same dropout masks as an unbroken one. It
        # starts on its own stream, not where the initialisation left the global generator (a
        # user's model: the caller's global generator is left as it was).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(stream_seed(cfg.seed, "dropout"))
            self.rng_state = self._global_rng_state()
        own_optimizer = optimizer is None
        if optimizer is None:
            optimizer = build_optimizer(
                self.model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        self.optimizer = optimizer
        # energy_source heldout: training steps see train_part only, energy batches heldout only
        self.train_part, self.heldout = split_heldout(cfg, len(train_set))
        self.steps_per_epoch = self._train_size() // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)}); "
                "lower --set batch_size"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.warmup_steps >= self.total_steps:
            raise UserError(
                f"warmup_steps {cfg.warmup_steps} leaves no step of the {self.total_steps}-step "
                f"budget for the search; lower --set warmup_steps (below {self.total_steps})"
            )
        # a given optimiser keeps the lr it was built with (compare's fine-tuning: constant)
        self.scheduler = None
        if own_optimizer:
            self.scheduler = build_scheduler(
                self.optimizer, schedule=cfg.lr_schedule, total_steps=self.total_steps
            )
        self.step = start_step  # a model trained elsewhere up to here continues
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self.energy_generator = stream(cfg.seed, "energy_batch")

    def _global_rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run the block on this learner's own random stream; the global one is untouched."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self.rng_state["cpu"])
            if cuda and "cuda" in self.rng_state:
                torch.cuda.set_rng_state(self.rng_state["cuda"], self.device)
            yield
            self.rng_state = self._global_rng_state()

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A CPU batch on this learner's device, in its memory format."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def _train_size(self) -> int:
        return len(self.train_set) if self.train_part is None else len(self.train_part)

    def train_indices(self, step: int) -> torch.Tensor:
        """(batch_size,) sample indexes of training step ``step``: a seeded permutation of the
        training part per epoch, so any step's batch can be found again after a resume."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:  # one permutation per epoch, not per step
            g = stream(self.cfg.seed, "data_order", epoch)
            self._perm = torch.randperm(self._train_size(), generator=g)
            if self.train_part is not None:
                self._perm = self.train_part[self._perm]
            self._perm_epoch = epoch
        bs = self.cfg.batch_size
        return self._perm[k * bs : (k + 1) * bs]

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of training step ``step`` (:meth:`train_indices`)."""
        return fetch_batch(self.train_set, self.train_indices(step))

    def draw_energy_indices(self) -> torch.Tensor:
        """Sample indexes of the next energy batch: a fresh draw of ``energy_batch_size`` from
        the training set, or from the held-out part with ``energy_source: heldout``."""
        pool = len(self.train_set) if self.heldout is None else len(self.heldout)
        n = min(self.cfg.energy_batch_size, pool)
        idx = torch.randperm(pool, generator=self.energy_generator)[:n]
        return idx if self.heldout is None else self.heldout[idx]

    def draw_energy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh random batch (CPU) on which one generation is judged."""
        return fetch_batch(self.train_set, self.draw_energy_indices())

    def energy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`draw_energy_batch`, on the learner's device."""
        return self.to_device(*self.draw_energy_batch())

    def energies(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return compute_energies(
            self.model,
            self.masker,
            states,
            x,
            y,
            states_per_pass=cfg.states_per_pass,
            sparsity_lambda=cfg.sparsity_lambda,
            amp=cfg.amp,
            bn=cfg.energy_bn,
        )

    def train(self, state: torch.Tensor | None) -> float:
        """One masked step on the next training batch; raises UserError on a NaN loss."""
        x, y = self.to_device(*self.train_batch(self.step))
        with self.own_rng():
            loss = train_step(
                self.model, self.optimizer, self.masker, state, x, y, amp=self.cfg.amp
            )
        if self.scheduler is not None:
            self.scheduler.step()
        if not math.isfinite(loss):
            raise UserError(
                f"training loss became {loss} at step {self.step}; lower the learning rate "
                f"(e.g. --set lr={self.cfg.lr / 10:g}); what was saved before is kept"
            )
        self.step += 1
        return loss

    def evaluate(self, test_set: Dataset, state: torch.Tensor | None) -> dict[str, float]:
        return evaluate(
            self.model,
            test_batches(test_set, self.cfg.eval_batch_size),
            device=self.device,
            masker=self.masker,
            state=state,
            channels_last=self.cfg.channels_last,
        )

    @torch.no_grad()
    def recalibrate_bn(self, state: torch.Tensor | None, batches: int) -> int:
        """Re-estimate every BatchNorm's running statistics with ``state`` applied, as a plain
        average over ``batches`` training batches of a fixed, seeded order. Training moves the
        statistics with momentum while the mask and weights change; this measures them for the
        final network. Nothing else changes (dropout stays off). Returns the batches used."""
        norms = [m for m in self.model.modules() if isinstance(m, _BATCH_NORMS)]
        bs = self.cfg.batch_size
        batches = min(batches, self._train_size() // bs)
        if not norms or batches <= 0:
            return 0
        saved = [(m.momentum, m.training) for m in norms]
        was_training = self.model.training
        self.model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
            m.train()
        order = torch.randperm(
            self._train_size(), generator=stream(self.cfg.seed, "bn_recalibrate")
        )
        if self.train_part is not None:  # the held-out part stays for the energies only
            order = self.train_part[order]
        try:
            with self.masker.applied(state):
                for k in range(batches):
                    x, _y = self.to_device(
                        *fetch_batch(self.train_set, order[k * bs : (k + 1) * bs])
                    )
                    self.model(x)
        finally:
            for m, (momentum, training) in zip(norms, saved, strict=True):
                m.momentum = momentum
                m.train(training)
            self.model.train(was_training)
        return batches

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            # on the CPU: it crosses the object store to a driver that may have no GPU
            "optimizer": tree_map(_on_cpu, self.optimizer.state_dict()),
            "step": self.step,
            "energy_generator": self.energy_generator.get_state(),
            "rng": dict(self.rng_state),
        }
        if self.scheduler is not None:  # constant lr: no entry, the checkpoint is as before
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.step = int(sd["step"])
        if self.scheduler is not None:  # a checkpoint without one was a constant-lr run's
            self.scheduler.load_state_dict(sd["scheduler"])
        self.energy_generator.set_state(sd["energy_generator"])
        if "rng" in sd:  # checkpoints written before the learner kept its own dropout stream
            rng = dict(sd["rng"])
            if self.device.type != "cuda":
                rng.pop("cuda", None)  # a CUDA run resumed on a CPU keeps the CPU stream
            self.rng_state = rng


@dataclass(frozen=True)
class OwnModel:
    """A user's own network for a run (the Python API, :func:`edrop_ray.prune`).

    module: on the CPU, with the weights the run starts from. It is never trained itself: every
    learner of the run (the dense baseline's, EDropout's) trains a deep copy of it.
    example: one CPU input batch, (B, ...), on which the units are traced and counted.
    """

    module: nn.Module
    example: torch.Tensor

    def learner(
        self,
        cfg: Config,
        train_set: Dataset,
        info: DataInfo,
        device: torch.device,
        units: Units | None = None,
    ) -> Learner:
        """A :class:`Learner` that trains a fresh copy of :attr:`module`."""
        return Learner(
            cfg,
            train_set,
            info,
            device,
            model=copy.deepcopy(self.module),
            example_inputs=self.example,
            units=units,
        )

    def without_weights(self) -> OwnModel:
        """This network as an evaluator gets it: its :func:`~edrop_ray.models.skeleton` (the
        structure, tens of kB pickled) and the example; the weights come from the trainer."""
        return OwnModel(skeleton(self.module), self.example)


def new_learner(
    cfg: Config, train_set: Dataset, info: DataInfo, device: torch.device, own: OwnModel | None
) -> Learner:
    """The learner of a run: ``cfg.model`` built from its name, or a copy of the user's ``own``."""
    if own is None:
        return Learner(cfg, train_set, info, device)
    return own.learner(cfg, train_set, info, device)
