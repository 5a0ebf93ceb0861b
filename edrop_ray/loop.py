"""The in-process EDropout run: propose -> energies -> select -> masked training step.

:class:`~edrop_ray.learner.Learner` owns the model, its optimiser and the data order;
:class:`~edrop_ray.search.Search` owns the population. :func:`run_edropout` alternates them on one
machine; the Ray runtime drives the very same two objects from its actors (through the
:class:`TrainingSide` and :class:`SearchSide` protocols).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from .config import Config
from .learner import Learner
from .seeds import stream
from .slim import count_params_macs, slim_model

__all__ = ["TrainingSide", "SearchSide", "run_edropout", "run_dense", "measure_pruned"]


class TrainingSide(Protocol):
    """What :func:`run_edropout` and ``SearchSide.run_generation`` ask of the side that owns the
    weights: :class:`Learner` in process, the Ray trainer's driver-side stand-in otherwise."""

    cfg: Config
    step: int  # training steps taken
    total_steps: int

    def train(self, state: torch.Tensor | None) -> float:
        """One masked step with ``state`` ((D,) bool, on the CPU); the loss."""
        ...


class SearchSide(Protocol):
    """What :func:`run_edropout` asks of the population's owner: :class:`~edrop_ray.search.Search`
    in process, the Ray coordinator's driver-side stand-in otherwise."""

    frozen: bool

    @property
    def best(self) -> torch.Tensor:
        """(D,) bool on the CPU: the state training uses now."""
        ...

    def run_generation(self, learner: Any) -> dict[str, Any]:
        """Propose, judge with ``learner``'s weights, select; the generation's record."""
        ...


def run_edropout(
    learner: TrainingSide,
    search: SearchSide,
    *,
    on_generation: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[], None] | None = None,
) -> None:
    """Alternate generations and masked training steps until the training budget is spent.

    ``learner`` is a :class:`Learner` and ``search`` a :class:`~edrop_ray.search.Search`, or the
    Ray runtime's stand-ins for them (same methods, work done by actors). on_generation gets each
    generation's record; on_checkpoint is called every ``checkpoint_every`` generations' worth of
    training steps.

    The first ``warmup_steps`` steps train dense (state None) and run no generation. Let W_t be
    the weights before training step t, and let a generation fall due at step t
    (``(t - warmup_steps) % evolve_every == 0``, t >= warmup_steps, search not frozen). Either
    way the generation is judged on W_t.

    - ``pipeline: false`` (exact): step t trains with the best state of *that* generation.
    - ``pipeline: true`` (one step stale): step t trains with the best state from before that
      generation (the previous generation's best; the initial best before the first), so the
      step and the judging both start from W_t and need nothing from each other. The Ray
      runtime runs them at the same time; here they run one after the other with the same
      result. The generation's best takes over from step t+1. Nothing stays in flight across
      a step, so checkpoints and resume are unchanged.
    """
    cfg = learner.cfg
    ckpt_steps = cfg.checkpoint_every * cfg.evolve_every
    sampler = stream(cfg.seed, "train_state")  # train_state: sampled only
    warmup = cfg.warmup_steps
    while learner.step < learner.total_steps:
        record = None
        if learner.step < warmup:  # dense, as the dense baseline trains; no generation yet
            learner.train(None)
            if on_checkpoint is not None and ckpt_steps and learner.step % ckpt_steps == 0:
                on_checkpoint()
            continue
        before = search.best  # with pipeline, what step t trains with
        if not search.frozen and (learner.step - warmup) % cfg.evolve_every == 0:
            t0 = time.perf_counter()
            record = search.run_generation(learner)
            record["energy_seconds"] = time.perf_counter() - t0
        if cfg.train_state == "sampled" and not search.frozen:
            state = search.sample_member(sampler)
        else:
            state = before if cfg.pipeline else search.best
        loss = learner.train(state)
        if record is not None:
            record["step"] = learner.step
            record["train_loss"] = loss
            if on_generation is not None:
                on_generation(record)
        if on_checkpoint is not None and ckpt_steps and learner.step % ckpt_steps == 0:
            on_checkpoint()


def measure_pruned(
    learner: Learner, test_set: Dataset, state: torch.Tensor
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The end of a run: Top-1/Top-5 with ``state`` applied, and the physically slimmed model
    with its parameters and MACs next to the dense model's. Moves the learner's model to the CPU.
    """
    scores = learner.evaluate(test_set, state)
    model_cpu = learner.model.to("cpu").float()
    slim = slim_model(model_cpu, learner.units, state, learner.example)
    params_dense, macs_dense = count_params_macs(model_cpu, learner.example)
    params_pruned, macs_pruned = count_params_macs(slim, learner.example)
    return slim, {
        "top1": scores["top1"],
        "top5": scores["top5"],
        "test_loss": scores["loss"],
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "prune_rate": 1.0 - params_pruned / params_dense,
        "macs_dense": macs_dense,
        "macs_pruned": macs_pruned,
        "kept_units": int(state.sum()),
        "num_units": int(state.numel()),
    }


def run_dense(learner: Learner) -> None:
    """Train the same model for the same budget with no masking: the dense baseline."""
    while learner.step < learner.total_steps:
        learner.train(None)
