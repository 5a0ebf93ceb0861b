"""Starting the Ray runtime of one run: placement, actors, and the driver's stand-ins.

:class:`RayRuntime` places the evaluators (a placement group, PACK or STRICT_SPREAD), the
trainer and the coordinator, and exposes two stand-ins, :class:`RemoteLearner` and
:class:`RemoteSearch`, with the methods :func:`edrop_ray.loop.run_edropout` calls on the
in-process objects. The driver's loop is therefore the very same loop as the local backend's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)
from torch.utils.data import TensorDataset

from ..config import Config
from ..dataset_info import DataInfo
from ..errors import UserError
from ..learner import Learner
from ..units import Units
from .actors import CONCURRENCY_GROUPS, EVALUATOR_GROUPS, Evaluator, Trainer
from .coordinator import Coordinator
from .pool import InputsLost
from .transport import choose_transport
from .wire import pack, unpack

__all__ = ["RayRuntime", "RemoteLearner", "RemoteSearch", "connect", "plan_resources"]

# Generous bound for calls that do no model work (state, info): a hung cluster must not hang us.
_CONTROL_TIMEOUT_S = 300.0


def connect(cfg: Config) -> bool:
    """Attach to Ray: the given address, the cluster of a running job, or a new local instance.

    Returns True when this call started Ray (and so should stop it at the end).
    """
    from ..cluster import connect_ray, prune_instance

    return connect_ray(cfg.ray_address, **prune_instance(cfg))


def plan_resources(cfg: Config, cluster: dict[str, float]) -> tuple[int, float, float]:
    """(number of evaluators, GPUs per evaluator, trainer GPUs) for a cluster's resources.

    Auto (-1) GPU settings: on 2+ GPUs the trainer and every evaluator get a whole GPU each; on
    one GPU they share it half and half; without GPUs everything runs on CPU slots. With
    ``num_evaluators`` 0 there is one evaluator per GPU left after the trainer's, else
    ``min(2, CPUs)``.
    """
    gpus = float(cluster.get("GPU", 0.0))
    share = 1.0 if gpus >= 2 else (0.5 if gpus >= 1 else 0.0)
    per_eval = share if cfg.gpus_per_evaluator < 0 else cfg.gpus_per_evaluator
    trainer = share if cfg.trainer_gpus < 0 else cfg.trainer_gpus
    n = cfg.num_evaluators
    if not n:
        if per_eval > 0:
            n = max(1, int((gpus - trainer) / per_eval))
        else:
            n = max(1, min(2, int(cluster.get("CPU", 1))))
    return n, per_eval, trainer


class RayRuntime:
    """The actors of one run, placed on the cluster.

    Starting is two-phase, so that the actors' start-up (a Python process each, importing torch,
    building the model, initialising CUDA) overlaps the driver's other work, the dense baseline
    above all: the constructor starts Ray (when it is not running) and *asks* for the placement
    group, the evaluators, the trainer and the coordinator, waiting for none of them;
    :meth:`wait_ready` waits for them and chooses how the weights travel. Whatever fails on the
    way, or a Ctrl-C, kills the actors started so far (:meth:`shutdown` is safe to repeat).

    own, train_set: a user's own network (:class:`~edrop_ray.learner.OwnModel`: the module, pickled
    with its weights, and its example inputs) and training set; the set goes through the object
    store once, and without them the trainer loads ``cfg.dataset`` itself. ``model``: the
    network the replicas are built from: ``own``, or the driver's
    :func:`~edrop_ray.models.portable_copy` of ``cfg.model`` with its initial weights (so no
    actor imports torchvision); the trainer gets it through the object store, each evaluator
    its :func:`~edrop_ray.models.skeleton` by value (no weights: they come from the trainer).
    None: every actor builds ``cfg.model`` by name. ``units``: the model's units as the driver
    traced them, sent to every actor (each checks they fit its model) instead of traced again
    in each, which would import Torch-Pruning and trace the model there (0.4-0.5 CPU-seconds
    per actor for ResNet-18 on 32 px, more for larger models and inputs). ``timings`` holds the
    seconds of each start-up phase (``ray_init_s``, ``submit_s``, ``ready_wait_s``: what
    :meth:`wait_ready` still waited).
    """

    def __init__(
        self,
        cfg: Config,
        info: DataInfo,
        units: Units,
        *,
        counter=None,
        own=None,
        model=None,
        train_set=None,
        wait: bool = True,
    ):
        self.cfg = cfg
        self.units = units
        self.evaluators: list = []
        self.trainer = self.coordinator = self.pg = None
        self.started_ray = False
        self._stopped = self._ready = False
        self._stopping: threading.Thread | None = None  # a Ray this runtime started, stopping
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.started_ray = connect(cfg)
        t1 = time.perf_counter()
        self.timings["ray_init_s"] = t1 - t0
        try:
            self._submit(info, counter, own, own if model is None else model, train_set)
            self.timings["submit_s"] = time.perf_counter() - t1
            if wait:
                self.wait_ready()
        except BaseException:
            self.shutdown()
            raise

    def _submit(self, info: DataInfo, counter, own, model, train_set) -> None:
        """Ask for the placement group and every actor; wait for none of them."""
        cfg = self.cfg
        own_ref = data_ref = skeleton = None
        if model is not None:
            # the trainer's, with its weights, through the object store; the evaluators get
            # its structure only, by value (tens of kB): their weights come from the trainer,
            # and a restarted evaluator is built from arguments of its own, no reference
            own_ref = ray.put(model)
            skeleton = model.without_weights()
        if own is not None or isinstance(train_set, TensorDataset):
            # a user's data, or a set the driver already holds in memory (digits, the MNIST
            # test split): the trainer takes the driver's copy instead of reading it again;
            # sets read from files are read where the trainer runs
            data_ref = ray.put((train_set, info))
        cluster = ray.cluster_resources()
        n, per_eval, trainer_gpus = plan_resources(cfg, cluster)
        # auto: a private instance lends the trainer every core (it and the evaluators take
        # turns); on a cluster the trainer asks for 2 CPUs for its data and optimiser
        trainer_cpus = cfg.trainer_cpus or ((os.cpu_count() or 1) if self.started_ray else 2)
        need_cpu = n * cfg.cpus_per_evaluator + trainer_cpus
        need_gpu = n * per_eval + trainer_gpus
        if need_cpu > cluster.get("CPU", 0) or need_gpu > cluster.get("GPU", 0):
            raise UserError(
                f"{n} evaluators and the trainer need {need_cpu:g} CPUs and {need_gpu:g} GPUs; "
                f"the cluster has {cluster.get('CPU', 0):g} and {cluster.get('GPU', 0):g}; "
                "lower --set num_evaluators / cpus_per_evaluator or add nodes"
            )
        bundle = {"CPU": cfg.cpus_per_evaluator}
        if per_eval > 0:
            bundle["GPU"] = per_eval
        self._bundle = bundle
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=cfg.placement_strategy)
        # The evaluators wait in Ray's queue for their bundles; wait_ready() bounds that wait.
        self.evaluators = [
            ray.remote(concurrency_groups=EVALUATOR_GROUPS)(Evaluator)
            .options(
                num_cpus=cfg.cpus_per_evaluator,
                num_gpus=per_eval,
                max_restarts=-1,  # a lost evaluator comes back; the coordinator re-runs its shard
                max_task_retries=0,  # ...and it, not Ray, decides where a failed shard goes
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                ),
            )
            .remote(cfg, info, i, skeleton, self.units)
            for i in range(n)
        ]
        self.trainer = (
            ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Trainer)
            .options(num_cpus=trainer_cpus, num_gpus=trainer_gpus, max_restarts=0)
            .remote(cfg, trainer_cpus, own_ref, data_ref, self.units)
        )
        # The coordinator holds nothing larger than the population and reserves no resources;
        # it lives on the driver's node, so that losing a worker node never takes it along.
        # Its transport is set by wait_ready(), once the ranks have said where they landed.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.coordinator = (
            ray.remote(Coordinator)
            .options(num_cpus=0, scheduling_strategy=here)
            .remote(cfg, self.units.num_units, self.evaluators, self.trainer, counter=counter)
        )

    def wait_ready(self) -> None:
        """Wait until every actor has started; choose the weights' transport. Raises UserError
        (with the actors killed) when the cluster cannot place them or one fails to start."""
        if self._ready:
            return
        t0 = time.perf_counter()
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.timings["ready_wait_s"] = time.perf_counter() - t0
        self._ready = True

    def _wait_ready(self) -> None:
        cfg, n = self.cfg, len(self.evaluators)
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.generation_timeout_s)
        if not ready:
            raise UserError(
                f"the cluster cannot place {n} evaluators of {self._bundle} with "
                f"{cfg.placement_strategy}; available: {ray.available_resources()}; "
                "lower --set num_evaluators or change placement_strategy"
            )
        # How the weights travel depends on where the ranks landed (trainer first).
        ranks = ray.get(
            [self.trainer.identity.remote()] + [e.identity.remote() for e in self.evaluators],
            timeout=_CONTROL_TIMEOUT_S,
        )
        self.trainer_identity = ranks[0]
        self.transport, backend, why = choose_transport(cfg.weights_transport, ranks)
        self.transport_name = self.transport + (
            f" ({backend}, {cfg.weights_dtype})" if backend else ""
        )
        self.transport_line = f"ray: {n} evaluators; weights by {self.transport_name}: {why}"
        info, _ = ray.get(
            [
                self.trainer.info.remote(),
                self.coordinator.set_transport.remote((self.transport, backend)),
            ],
            timeout=_CONTROL_TIMEOUT_S,
        )
        self.learner = RemoteLearner(cfg, self.trainer, info["total_steps"], self.transport)
        self.search = RemoteSearch(cfg, self.coordinator)

    @contextmanager
    def guard(self, run_dir: str) -> Iterator[None]:
        """Turn the loss of the trainer or the coordinator (a node gone, a cluster restarted)
        into one line that says how to continue: the last checkpoint is intact."""
        try:
            yield
        except (RayActorError, GetTimeoutError, ObjectLostError, InputsLost) as e:
            raise UserError(
                f"the Ray run lost its trainer or coordinator ({type(e).__name__}); the last "
                f"checkpoint is kept: continue with `edrop-ray resume {run_dir}`"
            ) from e

    def identities(self) -> list[dict[str, Any]]:
        """pid and node of every evaluator (for tests and diagnostics)."""
        return ray.get([e.identity.remote() for e in self.evaluators], timeout=_CONTROL_TIMEOUT_S)

    def release(self) -> None:
        """Kill every actor asked for and remove the placement group, at once; a Ray this
        runtime started stops in a background thread (about a second here, nearly all of it
        waiting for Ray's processes to exit), so the driver can go on with work that needs no
        Ray, the final measurement above all. :meth:`shutdown` waits for it. Safe to call more
        than once, and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for actor in (*self.evaluators, self.trainer, self.coordinator):
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            if self.pg is not None:
                remove_placement_group(self.pg)
        finally:
            if self.started_ray:
                # Not a daemon: the interpreter waits for it at exit, before Ray's own atexit.
                self._stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
                self._stopping.start()

    def shutdown(self) -> None:
        """:meth:`release`, then wait until a Ray this runtime started has stopped."""
        self.release()
        if self._stopping is not None:
            self._stopping.join()
            self._stopping = None


class RemoteLearner:
    """Driver-side stand-in for :class:`~edrop_ray.learner.Learner`; the trainer actor works."""

    def __init__(self, cfg: Config, trainer, total_steps: int, transport: str = "object_store"):
        self.cfg = cfg
        self.trainer = trainer
        self.transport = transport
        self.total_steps = total_steps
        self.step = 0
        self._weights: list[ray.ObjectRef] | None = None
        self._weights_step = -1
        self._pending: tuple[torch.Tensor, ray.ObjectRef] | None = None  # a step under way

    def energy_batch(self) -> ray.ObjectRef:
        # Stays in the object store: the evaluators fetch it, the driver never does.
        return self.trainer.energy_batch.remote()

    def weights(self) -> tuple[list[ray.ObjectRef] | None, int]:
        """Weights at most ``weights_every`` steps old: (reference, version), or with the
        collective transport (None, version): the coordinator has the trainer broadcast them."""
        if self._weights_step < 0 or self.step - self._weights_step >= self.cfg.weights_every:
            if self.transport == "object_store":  # one object, shared by reference
                self._weights = [self.trainer.weights.remote()]
            self._weights_step = self.step
        return self._weights, self._weights_step

    def start_train(self, state: torch.Tensor, stage: int | None = None) -> None:
        """Submit the next step with ``state`` now (pipeline); :meth:`train` collects it.
        ``stage``: the trainer first stages weights of that version (the current step) for
        the generation's broadcast, which then goes out while the step runs."""
        if self._pending is not None:
            raise RuntimeError("a training step is already under way")
        self._pending = (state, self.trainer.train.remote(state, stage))

    def train(self, state: torch.Tensor) -> float:
        if self._pending is None:
            ref = self.trainer.train.remote(state)
        else:  # the step started with the generation: it must be the step asked for
            started, ref = self._pending
            self._pending = None
            if not torch.equal(started, state):
                raise RuntimeError("the pipelined step was started with another state")
        loss = ray.get(ref, timeout=_CONTROL_TIMEOUT_S)
        self.step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return unpack(ray.get(self.trainer.state_dict.remote(), timeout=_CONTROL_TIMEOUT_S))

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        ref = self.trainer.load_state_dict.remote(pack(sd))
        self.step = ray.get(ref, timeout=_CONTROL_TIMEOUT_S)
        self._weights, self._weights_step = None, -1

    def to_local(self, learner: Learner) -> Learner:
        """Load the trainer's current state into an in-process ``learner`` (for the report)."""
        learner.load_state_dict(self.state_dict())
        return learner


class _PopulationView:
    """The population as the driver sees it (for snapshots)."""

    def __init__(self, states: torch.Tensor, energies: torch.Tensor):
        self.states = states
        self.energies = energies


class RemoteSearch:
    """Driver-side stand-in for :class:`~edrop_ray.search.Search`; the coordinator owns it."""

    def __init__(self, cfg: Config, coordinator):
        self.cfg = cfg
        self.coordinator = coordinator
        self._pull()

    def _pull(self) -> None:
        sd = ray.get(self.coordinator.state_dict.remote(), timeout=_CONTROL_TIMEOUT_S)
        self._apply(sd["best"], bool(sd["frozen"]))
        self._population = _PopulationView(sd["states"], sd["energies"])
        self.generation = int(sd["generation"])
        c = int(sd["converged_at"])
        self.converged_at = None if c < 0 else c

    def _apply(self, best, frozen) -> None:
        self.best = best
        self.frozen = frozen
        self._population: _PopulationView | None = None  # the coordinator's, not fetched yet

    @property
    def population(self) -> _PopulationView:
        """The coordinator's current population, fetched the first time it is asked for after
        a generation: S x D bits that the driver needs only for its snapshots
        (``snapshot_every``), so a generation does not carry them (11.7 MB at S = 1024 on
        ResNet-50's units)."""
        if self._population is None:
            states, energies = ray.get(
                self.coordinator.population.remote(), timeout=_CONTROL_TIMEOUT_S
            )
            self._population = _PopulationView(states, energies)
        return self._population

    def run_generation(self, learner: RemoteLearner) -> dict[str, Any]:
        """One generation on the trainer's current weights W_t (t = ``learner.step``).

        With ``pipeline`` the trainer's step t, with the best state from before this
        generation (the rule of :func:`~edrop_ray.loop.run_edropout`), is submitted as soon as
        the generation's inputs are fixed, and runs while the evaluators judge. The weights
        ref and the batch are asked of the trainer before the step (an actor runs one caller's
        calls in order). With the collective transport the step first stages W_t for the
        broadcast (the trainer's group calls run in a thread of their own), so the broadcast,
        too, overlaps the step, and the generation is one round of calls either way.
        """
        weights, version = learner.weights()
        batch = learner.energy_batch()
        timeout = self.cfg.generation_timeout_s * 3 + _CONTROL_TIMEOUT_S
        ref = self.coordinator.generation.remote([batch], weights, version)
        if self.cfg.pipeline:
            fresh = learner.transport == "collective" and version == learner.step
            learner.start_train(self.best, stage=version if fresh else None)
        out = ray.get(ref, timeout=timeout)
        record = out["record"]
        self._apply(out["best"], record["frozen"])
        self.generation = record["generation"]
        self.converged_at = out["converged_at"]
        return record

    def state_dict(self) -> dict[str, Any]:
        return ray.get(self.coordinator.state_dict.remote(), timeout=_CONTROL_TIMEOUT_S)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        ray.get(self.coordinator.load_state_dict.remote(sd), timeout=_CONTROL_TIMEOUT_S)
        self._pull()
