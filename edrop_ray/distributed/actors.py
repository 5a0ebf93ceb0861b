"""The two Ray actors that hold a model. Each is a thin shell around the core objects; no
algorithm lives here. (The third, the coordinator, holds only states: :mod:`.coordinator`.)

- :class:`Trainer` wraps a :class:`~edrop_ray.learner.Learner`: masked training, energy batches,
  weights published to the object store.
- :class:`Evaluator` holds a copy of the model and computes the energies of one shard of
  candidates with :func:`~edrop_ray.energy.compute_energies`.

The classes are plain; :mod:`edrop_ray.distributed.runner` turns them into actors with the
resources and placement of the run.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from ..config import Config
from ..devices import ComputeThread, computes, cpu_threads, worker_device
from ..energy import compute_energies
from ..files import pack_rows, unpack_rows, unpack_states
from ..memory import keep_heap_memory
from .transport import FlatWeights, GroupMember, free_address, rank_identity
from .wire import pack, unpack

if TYPE_CHECKING:
    from ..dataset_info import DataInfo

__all__ = ["Trainer", "Evaluator", "CONCURRENCY_GROUPS", "EVALUATOR_GROUPS"]

# The model code (learner, models, data: torchvision and Torch-Pruning, seconds of CPU to import)
# is imported when a trainer or an evaluator is built, not with this module: the coordinator's
# process imports this module too, to unpickle its handles to these actors, and holds no model.
# Built from a portable model (models.portable_copy), neither actor imports torchvision at all.

# The trainer's threads: its process-group calls run beside its training steps.
CONCURRENCY_GROUPS = {"comm": 1}
# The evaluator's: liveness probes are answered while it serves the group.
EVALUATOR_GROUPS = {"probe": 1}


class Trainer:
    """Owns the model and optimiser; trains with the best state and publishes weights.

    own: the network to train (:class:`~edrop_ray.learner.OwnModel`: a user's, or the driver's
    portable copy of ``cfg.model`` with its initial weights), else None: ``cfg.model`` built
    here;
    data: ``(train_set, info)`` shipped once through the object store (a user's data, or a set
    the driver holds in memory), else read from ``cfg``'s data set where the trainer runs;
    units: the driver's :class:`~edrop_ray.units.Units` of the model (none: traced here).

    The process-group calls (``group_address``, ``join_group``, ``publish``) run in their own
    thread (the ``comm`` concurrency group, :data:`CONCURRENCY_GROUPS`), so a broadcast can go
    out while a training step runs. What a broadcast sends is *staged*: copied from the model
    into the send buffer under a lock, at the step it is for, either by ``publish`` itself or
    by the training step about to move past it (``train(state, stage=t)``); a step never
    changes a staged buffer, and a version can never be staged from weights mid-step.

    Every computation on the model (building it, steps, stagings, state dicts) runs on one
    thread, :attr:`compute` (:class:`~edrop_ray.devices.ComputeThread`: why, there); the
    ``comm`` thread only moves bytes. The lock is never held while waiting for that thread.
    """

    def __init__(self, cfg: Config, cpus: float, own=None, data=None, units=None):
        keep_heap_memory()
        self.cfg = cfg
        self.compute = ComputeThread(cpu_threads(cfg.cpu_threads, cpus))
        self.member: GroupMember | None = None
        self._batch: tuple[str | None, Any] = (None, None)  # the last energy batch, by task
        self._lock = threading.Condition()  # the model between a training step and a staging
        self._stepping = False
        self._staged = -1  # the weights version in the send buffer
        self._stage_due = -1  # the version a step on its way to the compute thread stages
        self._stage_s = 0.0
        self._flat: FlatWeights | None = None  # the object store's weights, packed
        self.learner = self.compute.run(self._build, own, data, units)

    def _build(self, own, data, units):
        from ..learner import Learner

        if data is None:
            from ..data import load_for  # torchvision: a data set read from files needs it

            train_set, _test, info = load_for(self.cfg)
        else:
            train_set, info = data
        device = worker_device(self.cfg.device)
        if own is None:
            return Learner(self.cfg, train_set, info, device, units=units)
        return own.learner(self.cfg, train_set, info, device, units)

    def info(self) -> dict[str, Any]:
        return {"total_steps": self.learner.total_steps, "step": self.learner.step}

    def identity(self) -> dict[str, Any]:
        return {"index": -1, **rank_identity(self.learner.device)}

    def train(self, state: torch.Tensor, stage: int | None = None) -> float:
        """One masked step with ``state``; with ``stage`` (the current step), first stage the
        weights of that version for a broadcast that may go out while the step runs."""
        if stage is not None:
            with self._lock:  # a broadcast of this version waits for the step to stage it
                self._stage_due = stage
        return self.compute.run(self._train, state, stage)

    def _train(self, state: torch.Tensor, stage: int | None) -> float:
        with self._lock:
            try:
                if stage is not None:
                    self._stage(stage)
            finally:
                self._stage_due = -1
                self._lock.notify_all()
            self._stepping = True
        try:
            return self.learner.train(state)
        finally:
            with self._lock:
                self._stepping = False

    def energy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next generation's batch (CPU tensors); returned through the object store, and
        kept here under this call's task id, so that :meth:`judge` need not fetch it back."""
        batch = self.compute.run(self.learner.draw_energy_batch)
        # (only inside Ray: asking outside it would start a Ray instance)
        task = ray.get_runtime_context().get_task_id() if ray.is_initialized() else None
        self._batch = (task, batch)
        return batch

    def _batch_of(self, ref: ray.ObjectRef) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch behind ``ref`` (a return of :meth:`energy_batch`): the one kept here when
        it is that one, else from the object store."""
        task, batch = self._batch
        return batch if ref.task_id().hex() == task else ray.get(ref)

    @computes
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
        if self.member is None:  # the send buffer, in the wire dtype (made once, before a join)
            self.compute.run(self._make_member)
        return self.member

    def _make_member(self) -> None:
        if self.member is None:
            self.member = GroupMember(
                self.learner.model, self.learner.device, self.cfg.weights_dtype, bind=False
            )

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

    def _stage_now(self, version: int) -> None:
        with self._lock:
            self._stage(version)

    def _stage_for_send(self, version: int) -> None:
        """(The ``comm`` thread.) Have weights ``version`` staged: by the step on its way that
        stages them (waited for), else on the compute thread now."""
        with self._lock:
            self._lock.wait_for(lambda: self._stage_due != version or self._staged == version)
            if self._staged == version:
                return
        self.compute.run(self._stage_now, version)

    @ray.method(concurrency_group="comm")
    def group_address(self) -> tuple[str, int]:
        return free_address()

    @ray.method(concurrency_group="comm")
    def join_group(self, address, rank, world_size, backend, timeout_s, epoch) -> int:
        member = self._member()
        return member.join(address, rank, world_size, backend, timeout_s, epoch)

    @ray.method(concurrency_group="comm")
    def publish(self, version: int, epoch: int) -> dict[str, float]:
        """Broadcast weights ``version`` (the step they were taken at) to the group.

        The version is staged first unless a training step already staged it; the same
        version again (a re-formed group) re-sends the staged buffer, so a late joiner gets
        exactly the weights the others judge with.
        """
        self._stage_for_send(version)
        out = self._member().publish(version, epoch, pack=False)
        out["pack_s"] = self._stage_s
        return out

    @ray.method(concurrency_group="comm")
    def judge(
        self, version: int, epoch: int, rows: np.ndarray, generation: int,
        batch: list[ray.ObjectRef],
    ) -> dict[str, Any]:  # fmt: skip
        """Have the serving evaluators propose and judge generation ``generation`` of the
        population ``rows`` (one bit-packed row per member) on the batch of ``batch`` (``[ref]``
        to a return of :meth:`energy_batch`) with weights ``version``, over the group: one call
        per generation, however many evaluators (:meth:`GroupMember.request`). The weights go
        out first when the group does not hold them yet (staged as :meth:`publish` stages
        them)."""
        member = self._member()
        send = member.version != version
        if send:
            self._stage_for_send(version)
        x, y = self._batch_of(batch[0])
        out = member.request(
            version, epoch, torch.from_numpy(rows), x.contiguous(), y.contiguous(),
            generation=generation, send_weights=send,
        )  # fmt: skip
        if out["sync"] is not None:
            out["sync"]["pack_s"] = self._stage_s
        out["trials"] = out["trials"].numpy()  # pickles as one array
        return out

    @ray.method(concurrency_group="comm")
    def stop_serving(self, epoch: int, ranks: list[int]) -> list[int]:
        """Tell the serving ``ranks`` to stop; the ranks told."""
        return self._member().stop(epoch, ranks)

    @computes
    def state_dict(self) -> dict[str, Any]:
        """The learner's state, its tensors as numpy arrays (:func:`~.wire.pack`: they cross
        Ray several times faster than tensors)."""
        return pack(self.learner.state_dict())

    @computes
    def load_state_dict(self, sd: dict[str, Any]) -> int:
        """Load a state whose tensors came as numpy arrays (:func:`~.wire.pack`)."""
        with self._lock:
            self.learner.load_state_dict(unpack(sd))
            self._staged = -1
        return self.learner.step


class Evaluator:
    """A model replica that judges a shard of candidate states on the generation's batch
    (``own``: the :func:`~edrop_ray.models.skeleton` of the trainer's network, a user's or the
    driver's portable copy of ``cfg.model``, given with no weights: they arrive from the
    trainer before the first judging; else ``cfg.model`` built here), its ``units`` the
    driver's (none: traced here). Its model is built and used on one thread, :attr:`compute`
    (as the trainer's)."""

    def __init__(self, cfg: Config, info: DataInfo, index: int, own=None, units=None):
        keep_heap_memory()
        self.cfg = cfg
        self.index = index
        self.device = worker_device(cfg.device)
        self.compute = ComputeThread(cpu_threads(cfg.cpu_threads, cfg.cpus_per_evaluator))
        replica = self.compute.run(self._build, info, own, units)
        self.model, self.units, self.masker = replica.model.eval(), replica.units, replica.masker
        self.memory_format = replica.memory_format
        self.member: GroupMember | None = None
        self.home: FlatWeights | None = None  # object store: the flat weights' layout
        self.version = -1

    def _build(self, info: DataInfo, own, units):
        from ..models import build_replica, materialize, replica_of

        if own is None:
            return build_replica(self.cfg, info, self.device, units)
        return replica_of(materialize(own.module), own.example, self.cfg, self.device, units)

    @ray.method(concurrency_group="probe")
    def identity(self) -> dict[str, Any]:
        # its own thread: it answers while the evaluator serves (liveness probes, diagnostics)
        return {"index": self.index, **rank_identity(self.device)}

    @computes
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
    @computes
    def join_group(self, address, rank, world_size, backend, timeout_s, epoch) -> int:
        if self.member is None:  # binds the model's tensors to the receive buffer, once
            self.member = GroupMember(self.model, self.device, self.cfg.weights_dtype, bind=True)
        self.version = -1
        return self.member.join(address, rank, world_size, backend, timeout_s, epoch)

    @computes
    def receive(self, version: int, epoch: int) -> dict[str, float]:
        if self.member is None:
            raise RuntimeError(f"evaluator {self.index} is in no group")
        self.version = -1
        out = self.member.receive(version, epoch)
        self.version = version
        return out

    @computes
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

    @computes
    def serve(self, epoch: int, proposer) -> dict[str, Any]:
        """Propose and judge the trainer's requests over group ``epoch`` until told to stop:
        the trials of this rank's shard of the members, by ``proposer`` (the search's
        :class:`~edrop_ray.search.Proposer`: the same trials the coordinator would propose).

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
                rows = req.rows.cpu().numpy()
                states = unpack_rows(rows, self.units.num_units)
                candidates, trials = proposer.candidates(states, req.members, req.generation)
                t1 = time.perf_counter()
                if candidates.shape[0]:
                    energies = self._judge(candidates, req.x, req.y)
                else:  # more ranks than members: nothing to judge
                    energies = torch.empty(0)
                seconds = (time.perf_counter() - t1, req.receive_s, t1 - t0)
                self.member.reply(req, energies, torch.from_numpy(pack_rows(trials)), seconds)
                served += 1
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which re-forms
            return {"ended": f"{type(e).__name__}: {e}", "served": served}
        return {"ended": "stopped", "served": served}
