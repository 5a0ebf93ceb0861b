"""The three Ray actors. Each is a thin shell around the core objects; no algorithm lives here.

- :class:`Trainer` wraps a :class:`~edrop_ray.learner.Learner`: masked training, energy batches,
  weights published to the object store.
- :class:`Evaluator` holds a copy of the model and computes the energies of one shard of
  candidates with :func:`~edrop_ray.energy.compute_energies`.
- :class:`Coordinator` wraps a :class:`~edrop_ray.search.Search`: it splits the candidates of a
  generation into shards, has its :class:`~edrop_ray.distributed.pool.EvaluatorPool` (the
  evaluators' health: live set, probes, re-runs) judge them, and selects.

The classes are plain; :mod:`edrop_ray.distributed.runner` turns them into actors with the
resources and placement of the run.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from ..config import Config
from ..data import DataInfo, load_for
from ..devices import set_cpu_threads, worker_device
from ..energy import compute_energies
from ..files import pack_rows, pack_states, unpack_rows, unpack_states
from ..learner import Learner
from ..models import build_replica, replica_of
from ..search import Search
from .pool import EvaluatorPool, InputsLost
from .transport import FlatWeights, GroupMember, free_address, rank_identity

__all__ = [
    "Trainer", "Evaluator", "Coordinator", "InputsLost", "CONCURRENCY_GROUPS", "EVALUATOR_GROUPS",
]  # fmt: skip

# The trainer's threads: its process-group calls run beside its training steps.
CONCURRENCY_GROUPS = {"comm": 1}
# The evaluator's: liveness probes are answered while it serves the group.
EVALUATOR_GROUPS = {"probe": 1}


class Trainer:
    """Owns the model and optimiser; trains with the best state and publishes weights.

    own, data: a user's own network (:class:`~edrop_ray.learner.OwnModel`) and its
    ``(train_set, info)``, shipped once through the object store; else both come from ``cfg``.

    The process-group calls (``group_address``, ``join_group``, ``publish``) run in their own
    thread (the ``comm`` concurrency group, :data:`CONCURRENCY_GROUPS`), so a broadcast can go
    out while a training step runs. What a broadcast sends is *staged*: copied from the model
    into the send buffer under a lock, at the step it is for, either by ``publish`` itself or
    by the training step about to move past it (``train(state, stage=t)``); a step never
    changes a staged buffer, and a version can never be staged from weights mid-step.
    """

    def __init__(self, cfg: Config, cpus: float, own=None, data=None):
        set_cpu_threads(cfg.cpu_threads, cpus)
        self.cfg = cfg
        if own is None:
            train_set, _test, info = load_for(cfg)
            self.learner = Learner(cfg, train_set, info, worker_device(cfg.device))
        else:
            train_set, info = data
            self.learner = own.learner(cfg, train_set, info, worker_device(cfg.device))
        self.member: GroupMember | None = None
        self._batch: tuple[str | None, Any] = (None, None)  # the last energy batch, by task
        self._lock = threading.Lock()  # the model between a training step and a staging
        self._stepping = False
        self._staged = -1  # the weights version in the send buffer
        self._stage_s = 0.0
        self._flat: FlatWeights | None = None  # the object store's weights, packed

    def info(self) -> dict[str, Any]:
        return {"total_steps": self.learner.total_steps, "step": self.learner.step}

    def identity(self) -> dict[str, Any]:
        return {"index": -1, **rank_identity(self.learner.device)}

    def train(self, state: torch.Tensor, stage: int | None = None) -> float:
        """One masked step with ``state``; with ``stage`` (the current step), first stage the
        weights of that version for a broadcast that may go out while the step runs."""
        with self._lock:
            if stage is not None:
                self._stage(stage)
            self._stepping = True
        try:
            return self.learner.train(state)
        finally:
            with self._lock:
                self._stepping = False

    def energy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next generation's batch (CPU tensors); returned through the object store, and
        kept here under this call's task id, so that :meth:`judge` need not fetch it back."""
        batch = self.learner.draw_energy_batch()
        # (only inside Ray: asking outside it would start a Ray instance)
        task = ray.get_runtime_context().get_task_id() if ray.is_initialized() else None
        self._batch = (task, batch)
        return batch

    def _batch_of(self, ref: ray.ObjectRef) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch behind ``ref`` (a return of :meth:`energy_batch`): the one kept here when
        it is that one, else from the object store."""
        task, batch = self._batch
        return batch if ref.task_id().hex() == task else ray.get(ref)

    def weights(self) -> np.ndarray:
        """The current weights and floating BN buffers as one flat fp32 array (CPU), laid out
        as :class:`~edrop_ray.distributed.transport.FlatWeights` over the model; returned
        through the object store.

        One array is one copy into the store and a zero-copy read for each evaluator on the
        node; a dict of tensors is pickled tensor by tensor and unpickled by each evaluator
        again (ResNet-18 on the CPU: 41 ms instead of 135 ms per version, README).
        """
        if self._flat is None:
            self._flat = FlatWeights(
                self.learner.model, device=self.learner.device, dtype=torch.float32
            )
        self._flat.pack()
        return self._flat.flat.cpu().numpy()  # one device -> host copy on a GPU

    # --- the collective transport (rank 0)
    def _member(self) -> GroupMember:
        if self.member is None:  # the send buffer, in the wire dtype
            self.member = GroupMember(
                self.learner.model, self.learner.device, self.cfg.weights_dtype, bind=False
            )
        return self.member

    def _stage(self, version: int) -> None:
        """Copy weights ``version`` into the send buffer (the lock held); a no-op when they are
        there already."""
        if version == self._staged:
            return
        if version != self.learner.step or self._stepping:
            raise RuntimeError(f"weights {version} asked for at step {self.learner.step}")
        t0 = time.perf_counter()
        self._member().home.pack()
        self._staged = version
        self._stage_s = time.perf_counter() - t0

    @ray.method(concurrency_group="comm")
    def group_address(self) -> tuple[str, int]:
        return free_address()

    @ray.method(concurrency_group="comm")
    def join_group(self, address, rank, world_size, backend, timeout_s, epoch) -> int:
        with self._lock:
            member = self._member()
        return member.join(address, rank, world_size, backend, timeout_s, epoch)

    @ray.method(concurrency_group="comm")
    def publish(self, version: int, epoch: int) -> dict[str, float]:
        """Broadcast weights ``version`` (the step they were taken at) to the group.

        The version is staged first unless a training step already staged it; the same
        version again (a re-formed group) re-sends the staged buffer, so a late joiner gets
        exactly the weights the others judge with.
        """
        with self._lock:
            self._stage(version)
            member = self._member()
        out = member.publish(version, epoch, pack=False)
        out["pack_s"] = self._stage_s
        return out

    @ray.method(concurrency_group="comm")
    def judge(
        self, version: int, epoch: int, packed: np.ndarray, batch: list[ray.ObjectRef]
    ) -> dict[str, Any]:
        """Have the serving evaluators judge the ``packed`` candidates (one bit-packed row each)
        on the batch of ``batch`` (``[ref]`` to a return of :meth:`energy_batch`) with weights
        ``version``, over the group: one call per generation, however many evaluators
        (:meth:`GroupMember.request`). The weights go out first when the group does not hold
        them yet (staged as :meth:`publish` stages them)."""
        with self._lock:
            member = self._member()
            send = member.version != version
            if send:
                self._stage(version)
        x, y = self._batch_of(batch[0])
        out = member.request(
            version, epoch, torch.tensor(packed), x.contiguous(), y.contiguous(),
            send_weights=send,
        )  # fmt: skip
        if out["sync"] is not None:
            out["sync"]["pack_s"] = self._stage_s
        return out

    @ray.method(concurrency_group="comm")
    def stop_serving(self, epoch: int, ranks: list[int]) -> list[int]:
        """Tell the serving ``ranks`` to stop; the ranks told."""
        return self._member().stop(epoch, ranks)

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        with self._lock:
            self.learner.load_state_dict(sd)
            self._staged = -1
        return self.learner.step


class Evaluator:
    """A model replica that judges a shard of candidate states on the generation's batch
    (``cfg.model``, or ``own``: a user's network, this actor's own unpickled copy)."""

    def __init__(self, cfg: Config, info: DataInfo, index: int, own=None):
        set_cpu_threads(cfg.cpu_threads, cfg.cpus_per_evaluator)
        self.cfg = cfg
        self.index = index
        self.device = worker_device(cfg.device)
        if own is None:
            replica = build_replica(cfg, info, self.device)
        else:
            replica = replica_of(own.module, own.example, cfg, self.device)
        self.model, self.units, self.masker = replica.model.eval(), replica.units, replica.masker
        self.memory_format = replica.memory_format
        self.member: GroupMember | None = None
        self.home: FlatWeights | None = None  # object store: the flat weights' layout
        self.version = -1

    @ray.method(concurrency_group="probe")
    def identity(self) -> dict[str, Any]:
        # its own thread: it answers while the evaluator serves (liveness probes, diagnostics)
        return {"index": self.index, **rank_identity(self.device)}

    def load_weights(self, flat: np.ndarray) -> None:
        """Take the trainer's flat weights (:meth:`Trainer.weights`): one copy to this
        evaluator's device, then one per tensor of the model."""
        if self.home is None:  # the layout, and a staging buffer on this device
            self.home = FlatWeights(self.model, device=self.device, dtype=torch.float32)
        with warnings.catch_warnings():  # the store's array is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(flat)
        self.home.unpack(src)

    # --- the collective transport (ranks 1..N)
    def join_group(self, address, rank, world_size, backend, timeout_s, epoch) -> int:
        if self.member is None:  # binds the model's tensors to the receive buffer, once
            self.member = GroupMember(self.model, self.device, self.cfg.weights_dtype, bind=True)
        self.version = -1
        return self.member.join(address, rank, world_size, backend, timeout_s, epoch)

    def receive(self, version: int, epoch: int) -> dict[str, float]:
        if self.member is None:
            raise RuntimeError(f"evaluator {self.index} is in no group")
        self.version = -1
        out = self.member.receive(version, epoch)
        self.version = version
        return out

    def evaluate(
        self,
        shard: int,
        packed: list[bytes],
        batch: tuple[torch.Tensor, torch.Tensor],
        weights: list[ray.ObjectRef] | None,
        version: int,
    ) -> tuple[int, torch.Tensor, float, float]:
        """Energies of the bit-packed ``packed`` states -> (shard, (n,) float, seconds spent
        computing them, seconds spent receiving new weights).

        ``weights`` is a one-element list with the object-store reference (Ray hands it over
        unresolved: the weights are fetched only when their version changed, after a restart
        too), or None with the collective transport: then the weights of ``version`` have
        arrived by broadcast. (In the steady state the collective transport judges over the
        group instead: :meth:`serve`.)
        """
        t0 = time.perf_counter()
        if version != self.version:
            if weights is not None:
                self.version = -1  # a failed load leaves no version behind
                self.load_weights(ray.get(weights[0]))
                self.version = version
            else:
                raise RuntimeError(
                    f"evaluator {self.index} holds weights {self.version}, not {version}"
                )
        t1 = time.perf_counter()
        energies = self._judge(unpack_states(packed, self.units.num_units), *batch)
        return shard, energies, time.perf_counter() - t1, t1 - t0

    def _judge(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        return compute_energies(
            self.model,
            self.masker,
            states,
            x,
            y.to(self.device),
            states_per_pass=self.cfg.states_per_pass,
            sparsity_lambda=self.cfg.sparsity_lambda,
            amp=self.cfg.amp,
        )

    def serve(self, epoch: int) -> dict[str, Any]:
        """Judge the trainer's requests over group ``epoch`` until told to stop.

        Returns why it ended (``"stopped"``, or the error of a failed exchange: the group is
        then broken) and how many requests it served; it never raises, so the coordinator
        tells a broken group from a dead evaluator (whose call fails).
        """
        served = 0
        try:
            if self.member is None:
                raise RuntimeError(f"evaluator {self.index} is in no group")
            while (req := self.member.next_request(epoch)) is not None:
                self.version = self.member.version
                t0 = time.perf_counter()
                states = unpack_rows(req.packed.cpu().numpy(), self.units.num_units)
                if states.shape[0]:
                    energies = self._judge(states, req.x, req.y)
                else:  # more ranks than candidates: nothing to judge
                    energies = torch.empty(0)
                self.member.reply(energies, time.perf_counter() - t0, req.receive_s)
                served += 1
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which re-forms
            return {"ended": f"{type(e).__name__}: {e}", "served": served}
        return {"ended": "stopped", "served": served}


class Coordinator:
    """Owns the population; farms each generation out to the evaluators and selects.

    With the collective transport it also keeps the process group: before a generation it
    makes sure every live evaluator holds the generation's weights, re-forming the group from
    the live ranks when one was lost or came back.
    """

    def __init__(
        self, cfg: Config, num_units: int, evaluators: list, trainer=None,
        transport: tuple[str, str] = ("object_store", ""), counter=None,
    ):  # fmt: skip
        self.cfg = cfg
        self.search = Search.from_config(
            cfg, num_units, counter=counter
        )  # counter: budget.Counter or None
        self.pool = EvaluatorPool(evaluators, cfg.generation_timeout_s)
        self.trainer = trainer
        self.transport, self.backend = transport
        self.lost_in_sync = 0  # evaluators lost while the weights went out
        self.members: list[int] | None = None  # evaluators in the current group, by index
        self.epoch = -1  # the group's formation number
        self.regroups = 0
        self.grouped = 0  # generations judged over the process group (one call in all)
        self.serving: dict[int, ray.ObjectRef] = {}  # evaluator -> its serving loop
        self.synced = -1  # the weights version every member holds
        # the trainer's side of each broadcast, and where each generation's time went
        self.sync_log: deque[dict[str, float]] = deque(maxlen=1000)
        self.timings: deque[dict[str, Any]] = deque(maxlen=1000)

    def set_transport(self, transport: tuple[str, str]) -> None:
        """(transport, backend), chosen once every rank has said where it landed: the runtime
        learns that only after it asked for the coordinator beside the other actors."""
        self.transport, self.backend = transport

    def generation(
        self, batch: list[ray.ObjectRef], weights: list[ray.ObjectRef] | None, version: int
    ) -> dict[str, Any]:
        """Propose, evaluate across evaluators, select; return the record and the new state."""
        t0 = time.perf_counter()
        candidates = self.search.propose()
        t1 = time.perf_counter()
        self._compute: list[float] = []
        self._receive: list[float] = []
        self._phases: dict[str, float] = {}  # the group exchange's, seen by the trainer
        energies, sync_s = None, 0.0
        if self.transport == "collective":
            energies = self._judge_in_group(candidates, batch[0], version)
        if energies is None:
            if self.transport == "collective":  # not possible, or a rank failed: sync first
                t = time.perf_counter()
                self._sync(version)
                sync_s = time.perf_counter() - t
            energies = self._evaluate(candidates, batch[0], weights, version)
        t3 = time.perf_counter()
        record = self.search.select(energies)
        self.timings.append(
            {"propose_s": t1 - t0, "sync_s": sync_s, "evaluate_s": t3 - t1 - sync_s,
             "compute_s": self._compute, "receive_s": self._receive, **self._phases,
             "select_s": time.perf_counter() - t3}
        )  # fmt: skip
        p = self.search.population
        record["evaluators"] = self.pool.num_healthy()
        return {
            "record": record,
            "best": p.best,
            "states": p.states,
            "energies": p.energies,
            "converged_at": self.search.converged_at,
        }

    # --- the process group
    def _form_group(self, want: list[int]) -> bool:
        """Destroy the old group and form a new one of the trainer and evaluators ``want``."""
        self.epoch += 1
        self.regroups += 1
        t = self.pool.timeout_s
        address = ray.get(self.trainer.group_address.remote(), timeout=t)
        world, e = len(want) + 1, self.epoch
        trainer = self.trainer.join_group.remote(address, 0, world, self.backend, t, e)
        rank = {i: r for r, i in enumerate(want, start=1)}
        failed, error = self.pool.foreach(
            lambda i, ev: ev.join_group.remote(address, rank[i], world, self.backend, t, e),
            want,
            others={trainer: -1},
        )
        ok = not failed and error is None
        if ok:
            self.pool.set_healthy(want)
        self.members = want if ok else None
        self.synced = -1
        return ok

    def _sync(self, version: int) -> None:
        """Every live evaluator holds weights ``version`` when this returns (and serves no
        more: the calls of this path queue behind a serving loop)."""
        self._stop_serving()
        error: Exception | None = None
        for _ in range(2 * len(self.pool) + 2):
            # with every evaluator marked dead, try them all again (as the shards do)
            want = self.pool.healthy()
            if want != self.members:
                if not self._form_group(want):
                    continue
            if self.synced == version:
                return
            trainer = self.trainer.publish.remote(version, self.epoch)
            failed, error = self.pool.foreach(
                lambda i, ev: ev.receive.remote(version, self.epoch), want, others={trainer: -1}
            )
            if not failed and error is None:
                self.synced = version
                self.sync_log.append(ray.get(trainer, timeout=self.pool.timeout_s))
                return
            self.lost_in_sync += len(failed)
            self.members = None  # a broadcast failed: the group is re-formed
        raise RuntimeError(f"no evaluator could receive weights {version}: {error!r}")

    def rejoin(self, version: int, timeout_s: float) -> dict[str, int]:
        """Wait up to ``timeout_s`` for evaluators marked dead to come back, then send them
        weights ``version`` (the trainer's current step): how a restarted evaluator rejoins
        between generations, on demand."""
        deadline = time.monotonic() + timeout_s
        while self.pool.num_healthy() < len(self.pool) and time.monotonic() < deadline:
            self.pool.probe()
            time.sleep(0.2)
        if self.transport == "collective":
            self._sync(version)
        return self.stats()

    def _judge_in_group(self, candidates, batch_ref, version: int) -> torch.Tensor | None:
        """The generation judged over the process group: one call, the trainer's, whatever
        the number of evaluators (they serve in a loop, started once per group).

        Only in the steady state: the group is formed from the live evaluators and every one
        of them still serves. Returns None otherwise, or when the exchange failed (the
        evaluators that died marked dead, the group to be re-formed); the caller then syncs
        and judges with one call per evaluator, re-running every shard, so the energies are
        the same.
        """
        want = self.pool.healthy()
        if self.members is None or want != self.members:
            return None
        if self.serving:
            done, _ = ray.wait(list(self.serving.values()), num_returns=1, timeout=0)
            if done:  # one stopped serving (died, or its group broke): re-form first
                self._stop_serving()
                self.members = None
                return None
        else:
            self.serving = {i: self.pool.actors[i].serve.remote(self.epoch) for i in want}
        packed = pack_rows(candidates)
        # the batch's reference, unresolved: the trainer drew it and still has it
        ref = self.trainer.judge.remote(version, self.epoch, packed, [batch_ref])
        try:
            out = ray.get(ref, timeout=self.pool.timeout_s + 30)
        except RayActorError as e:
            raise InputsLost(f"the trainer is gone: {e}") from e
        except (RayTaskError, GetTimeoutError, ObjectLostError):
            self._stop_serving()
            self.members = None  # the exchange failed: the group is re-formed
            return None
        self.synced = version
        self.grouped += 1
        if out["sync"] is not None:
            self.sync_log.append(out["sync"])
        self._compute, self._receive = out["compute_s"], out["receive_s"]
        self._phases = out["phases"]
        return out["energies"]

    def _stop_serving(self) -> None:
        """End the evaluators' serving loops: the ones still waiting are told to stop (over
        the group, by the trainer); one that died or does not end in time is marked dead."""
        if not self.serving:
            return
        serving, self.serving = self.serving, {}
        t = self.pool.timeout_s
        done, _ = ray.wait(list(serving.values()), num_returns=len(serving), timeout=0)
        waiting = [self.members.index(i) + 1 for i, r in serving.items()
                   if r not in done and self.members and i in self.members]  # fmt: skip
        if waiting:
            try:
                ray.get(self.trainer.stop_serving.remote(self.epoch, waiting), timeout=t)
            except RayActorError as e:
                raise InputsLost(f"the trainer is gone: {e}") from e
            except (RayTaskError, GetTimeoutError):
                pass  # the ones not told end when their group times out, or are marked dead
        ready, _ = ray.wait(list(serving.values()), num_returns=len(serving), timeout=t + 30)
        lost = []
        for i, ref in serving.items():
            try:
                if ref not in ready:
                    raise TimeoutError(f"evaluator {i} did not stop serving")
                ray.get(ref, timeout=t)
            except (RayActorError, RayTaskError, GetTimeoutError, TimeoutError):
                lost.append(i)
        self.pool.set_healthy(lost, False)
        self.lost_in_sync += len(lost)

    def _evaluate(self, candidates, batch_ref, weights, version) -> torch.Tensor:
        # never more shards than candidates: an evaluator with nothing to judge is left idle
        n = min(len(self.pool.healthy()), candidates.shape[0])
        shards = [pack_states(s) for s in torch.tensor_split(candidates, n)]
        results = self.pool.map(
            lambda ev, k: ev.evaluate.remote(k, shards[k], batch_ref, weights, version), n
        )
        return self._energies(results)

    def _energies(self, results: list) -> torch.Tensor:
        """The energies of ``results`` (evaluate's answers, in shard order), concatenated; the
        seconds each shard computed and received weights, kept for the timing log."""
        self._compute = [r[2] for r in results]
        self._receive = [r[3] for r in results]
        return torch.cat([r[1] for r in results])

    def timing_log(self) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
        """Per generation: seconds in propose, in a separate weight sync (0 when the weights
        went out in the judging round), evaluate (wall, that round included), each shard's
        compute and weight receive, select; and the trainer's side of each broadcast (bytes,
        pack, broadcast)."""
        return [dict(t) for t in self.timings], [dict(t) for t in self.sync_log]

    def live_evaluators(self) -> int:
        return self.pool.num_healthy()

    def stats(self) -> dict[str, Any]:
        return {
            "live": self.pool.num_healthy(),
            "reruns": self.pool.reruns,
            "lost_in_sync": self.lost_in_sync,
            "regroups": self.regroups,
            "grouped": self.grouped,
            "members": list(self.members or []),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.search.load_state_dict(sd)
