"""The three Ray actors. Each is a thin shell around the core objects; no algorithm lives here.

- :class:`Trainer` wraps a :class:`~edrop_ray.loop.Learner`: masked training, energy batches,
  weights published to the object store.
- :class:`Evaluator` holds a copy of the model and computes the energies of one shard of
  candidates with :func:`~edrop_ray.energy.compute_energies`.
- :class:`Coordinator` wraps a :class:`~edrop_ray.search.Search`: it splits the candidates of a
  generation across the live evaluators, re-runs the shards of dead or late ones, and selects.

The classes are plain; :mod:`edrop_ray.distributed.runner` turns them into actors with the
resources and placement of the run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from ..config import Config
from ..data import DataInfo, load_for
from ..devices import set_cpu_threads, worker_device
from ..energy import compute_energies
from ..loop import Learner
from ..models import build_replica
from ..search import Search

__all__ = ["Trainer", "Evaluator", "Coordinator", "InputsLost"]


class Trainer:
    """Owns the model and optimiser; trains with the best state and publishes weights."""

    def __init__(self, cfg: Config, cpus: float):
        set_cpu_threads(cfg.cpu_threads, cpus)
        train_set, _test, info = load_for(cfg)
        self.learner = Learner(cfg, train_set, info, worker_device(cfg.device))

    def info(self) -> dict[str, Any]:
        return {"total_steps": self.learner.total_steps, "step": self.learner.step}

    def train(self, state: torch.Tensor) -> float:
        return self.learner.train(state)

    def energy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next generation's batch (CPU tensors); returned through the object store."""
        return self.learner.draw_energy_batch()

    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights and BN statistics (CPU); returned through the object store."""
        return {k: v.detach().cpu() for k, v in self.learner.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        self.learner.load_state_dict(sd)
        return self.learner.step


class Evaluator:
    """A model replica that judges a shard of candidate states on the generation's batch."""

    def __init__(self, cfg: Config, info: DataInfo, index: int):
        set_cpu_threads(cfg.cpu_threads, cfg.cpus_per_evaluator)
        self.cfg = cfg
        self.index = index
        self.device = worker_device(cfg.device)
        replica = build_replica(cfg, info, self.device)
        self.model, self.units, self.masker = replica.model.eval(), replica.units, replica.masker
        self.memory_format = replica.memory_format
        self.version = -1

    def identity(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"index": self.index, "pid": os.getpid(), "node_id": ctx.get_node_id()}

    def evaluate(
        self,
        shard: int,
        states: torch.Tensor,
        batch: tuple[torch.Tensor, torch.Tensor],
        weights: list[ray.ObjectRef],
        version: int,
    ) -> tuple[int, torch.Tensor]:
        """Energies of ``states`` ((n, D) bool) -> (shard, (n,) float).

        ``weights`` is a one-element list so that Ray hands over the reference unresolved: the
        weights are fetched only when their version changed (after a restart, too).
        """
        if version != self.version:
            self.model.load_state_dict(ray.get(weights[0]))
            self.version = version
        x, y = batch
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        energies = compute_energies(
            self.model,
            self.masker,
            states,
            x,
            y.to(self.device),
            states_per_pass=self.cfg.states_per_pass,
            sparsity_lambda=self.cfg.sparsity_lambda,
            amp=self.cfg.amp,
        )
        return shard, energies


class InputsLost(RuntimeError):
    """The weights or the batch of a generation are gone (their owner, the trainer, died)."""


def _inputs_lost(e: Exception) -> bool:
    # An evaluator's own death is a bare RayActorError. A task error *caused* by a dead actor or
    # a lost object means an input (made by the trainer) could not be had.
    if isinstance(e, ObjectLostError):
        return True
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    return isinstance(cause, ObjectLostError | RayActorError)


class Coordinator:
    """Owns the population; farms each generation out to the evaluators and selects."""

    def __init__(self, cfg: Config, num_units: int, evaluators: list):
        self.cfg = cfg
        self.search = Search(cfg, num_units)
        self.evaluators = list(evaluators)
        self.live = [True] * len(self.evaluators)
        self.reruns = 0  # shards re-run on another evaluator, over the whole run
        self._probes: dict[int, ray.ObjectRef] = {}  # liveness probes of evaluators marked dead

    def generation(
        self, batch: list[ray.ObjectRef], weights: list[ray.ObjectRef], version: int
    ) -> dict[str, Any]:
        """Propose, evaluate across evaluators, select; return the record and the new state."""
        candidates = self.search.propose()
        energies = self._evaluate(candidates, batch[0], weights, version)
        record = self.search.select(energies)
        p = self.search.population
        record["evaluators"] = sum(self.live)
        return {
            "record": record,
            "best": p.best,
            "states": p.states,
            "energies": p.energies,
            "converged_at": self.search.converged_at,
        }

    def _evaluate(self, candidates, batch_ref, weights, version) -> torch.Tensor:
        alive = [i for i, ok in enumerate(self.live) if ok] or list(range(len(self.evaluators)))
        # never more shards than candidates: an evaluator with nothing to judge is left idle
        alive = alive[: candidates.shape[0]]
        shards = list(torch.tensor_split(candidates, len(alive)))
        results: dict[int, torch.Tensor] = {}
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}

        def submit(shard: int, worker: int) -> None:
            ref = self.evaluators[worker].evaluate.remote(
                shard, shards[shard], batch_ref, weights, version
            )
            pending[ref] = (shard, worker)

        for shard, worker in enumerate(alive):
            submit(shard, worker)
        deadline = time.monotonic() + self.cfg.generation_timeout_s
        turn = 0
        last_error: Exception | None = None
        while pending:
            timeout = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            failed: list[tuple[int, int]] = []
            if not ready:  # the generation's time is up: whoever is still out is late
                failed = list(pending.values())
                pending.clear()
            for ref in ready:
                shard, worker = pending.pop(ref)
                try:
                    index, energies = ray.get(ref, timeout=self.cfg.generation_timeout_s)
                    results[index] = energies
                except (RayActorError, RayTaskError, GetTimeoutError, ObjectLostError) as e:
                    if _inputs_lost(e):  # not the evaluator's fault: no one can judge this batch
                        raise InputsLost(f"the generation's weights or batch are gone: {e}") from e
                    failed.append((shard, worker))
                    last_error = e
            for shard, worker in failed:
                self.live[worker] = False
                others = [i for i, ok in enumerate(self.live) if ok]
                if not others:
                    raise RuntimeError(
                        f"every evaluator failed or timed out in this generation: {last_error!r}"
                    )
                self.reruns += 1
                submit(shard, others[turn % len(others)])
                turn += 1
            if failed:
                deadline = time.monotonic() + self.cfg.generation_timeout_s
        self._revive()
        return torch.cat([results[i] for i in range(len(shards))])

    def _revive(self) -> None:
        """Give evaluators marked dead another chance once Ray has restarted them.

        A probe is sent once and only looked at (timeout 0) each generation, so an evaluator
        whose node is gone for good never makes the generations wait.
        """
        for i, ok in enumerate(self.live):
            if ok:
                continue
            probe = self._probes.setdefault(i, self.evaluators[i].identity.remote())
            ready, _ = ray.wait([probe], timeout=0)
            if not ready:
                continue
            del self._probes[i]
            try:
                ray.get(probe, timeout=1.0)
                self.live[i] = True
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass  # still down: a new probe goes out next generation

    def live_evaluators(self) -> int:
        return sum(self.live)

    def stats(self) -> dict[str, int]:
        return {"live": sum(self.live), "reruns": self.reruns}

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.search.load_state_dict(sd)
