"""Attaching to Ray: the one place ``ray.init`` is called (Ray is imported on first use).

Both ways of running on Ray, the Ray backend of a prune (:mod:`edrop_ray.distributed.runner`) and
a Tune sweep (:mod:`edrop_ray.tune`), attach the same way: to Ray if it is already running in this
process, else to the given address (the config's ``ray_address``, else ``RAY_ADDRESS``), else to a
new private instance on this machine (no dashboard; logs stay in Ray's session folder).

``edrop-ray prune`` and ``resume`` start that private instance ahead (:func:`start_ahead`): on a
thread, while the command imports torch, reads the data and builds the model, so that Ray's
processes and the actors' worker processes (which import torch and the actors' modules before
they are asked for, :data:`PRELOAD`) boot on the cores the command leaves idle.
:func:`connect_ray` then takes that instance instead of starting one.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading

__all__ = [
    "PRELOAD",
    "PRIVATE_INSTANCE",
    "connect_ray",
    "prune_instance",
    "start_ahead",
    "start_private_instance",
    "stop_ahead",
]

# How a private instance starts: no dashboard, workers' logs kept in Ray's session folder.
# Ray's workers keep its default niceness (15): at nice 0 the actors booted during a CPU dense
# baseline but slowed it by as much, and runs were no faster (README, Benchmarks).
PRIVATE_INSTANCE = {"include_dashboard": False, "log_to_driver": False}

# What the worker processes of a prune's private instance import before they take an actor:
# torch and the actors' own modules (2-3 CPU-seconds each on this project's CPU machine). None of
# them touches CUDA on import (tests/test_cluster_start.py), so a worker's GPU is still the one
# Ray gives its actor when it is created.
PRELOAD = ("torch", "edrop_ray.distributed.actors", "edrop_ray.distributed.coordinator")


def prune_instance(cfg) -> dict[str, int]:
    """The private instance a prune on Ray starts: ``num_cpus`` and ``workers`` (the actors it
    asks for: the evaluators, the trainer and the coordinator).

    The trainer and the evaluators take turns (train, then judge), so they may share the cores:
    the instance advertises enough logical CPUs for all of them. Without ``num_evaluators`` the
    count is the CPU machine's (2); on a GPU machine it may be fewer (one per GPU left after the
    trainer's), and the workers started for the others stay idle.
    """
    n = cfg.num_evaluators or 2
    need = n * cfg.cpus_per_evaluator + (cfg.trainer_cpus or os.cpu_count() or 1)
    return {"num_cpus": max(os.cpu_count() or 1, math.ceil(need)), "workers": n + 2}


def connect_ray(
    address: str | None,
    *,
    num_cpus: int,
    workers: int | None = None,
    logging_level: int | None = None,
) -> bool:
    """Attach to Ray; True when this call started it (and so should stop it at the end).

    ``address``: a cluster's address, or None/empty for ``RAY_ADDRESS`` or, without it, a new
    local instance with ``num_cpus`` logical CPUs (and ``workers`` preloaded worker processes,
    :func:`start_private_instance`), or the one :func:`start_ahead` is starting. A failed start
    ahead raises here, as a failed start would. ``logging_level``: Ray's, when given.
    """
    ahead = _AHEAD.get("thread")
    if ahead is not None and not ahead.taken:
        ahead.started.wait()  # a Ctrl-C here leaves it to stop_ahead()
        ahead.taken = True
        if ahead.error is not None:
            raise ahead.error
        return True
    import ray

    if ray.is_initialized():
        return False
    logging = {} if logging_level is None else {"logging_level": logging_level}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, **logging)
        return False
    start_private_instance(num_cpus, workers=workers, **logging)
    return True


def start_private_instance(num_cpus: int, *, workers: int | None = None, **options) -> None:
    """``ray.init`` a new instance on this machine, as the tool starts its own (the tests and
    benchmarks too): :data:`PRIVATE_INSTANCE`, and Ray's processes started with
    :func:`~edrop_ray.memory.worker_environment` (the driver's environment is left as it was).

    ``workers``: how many worker processes Ray starts with the instance (at most ``num_cpus``),
    each importing :data:`PRELOAD` before it takes an actor, and kept until one does; later
    workers import it too. None: Ray's own start (as many as there are cores, importing
    nothing).
    """
    import ray

    from .memory import worker_environment

    if workers is not None:
        # Ray starts min(num_cpus, startup concurrency) workers as the driver connects, and
        # every worker imports preload_python_modules before it takes a task or an actor.
        # Ray keeps at most num_workers_soft_limit idle workers, by default as many as there
        # are CPUs *available*: a placement group's bundles count as taken, so the evaluators'
        # group made Ray kill two of the four workers started for the trainer and the
        # coordinator, which then waited for new ones (torch imported again, 2-3 s more).
        workers = max(1, workers)
        options["_system_config"] = {
            "preload_python_modules": list(PRELOAD),
            "worker_maximum_startup_concurrency": workers,
            "num_workers_soft_limit": workers,
        }
    env = worker_environment()  # only variables the driver's environment does not set
    os.environ.update(env)  # the raylet copies it, and starts the workers with it
    try:
        ray.init(num_cpus=num_cpus, **PRIVATE_INSTANCE, **options)
    finally:
        for name in env:
            del os.environ[name]


class _Start(threading.Thread):
    """:func:`start_private_instance` on a thread, which then lives until :func:`stop_ahead`.

    It must: Ray starts its processes with a parent-death signal (``PR_SET_PDEATHSIG``), which
    Linux sends when the *thread* that started them ends. The error of a failed start is kept
    for :func:`connect_ray` to raise in the main thread.
    """

    def __init__(self, size: dict[str, int]):
        super().__init__(name="edrop-ray-start", daemon=True)
        self.size = size
        self.error: BaseException | None = None
        self.started = threading.Event()  # ray.init returned (or failed)
        self.release = threading.Event()  # Ray is stopped: the thread may end
        self.taken = False  # connect_ray handed this instance to a run

    def run(self) -> None:
        quiet = _NotMainThreadWarning()
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(quiet)
        try:
            start_private_instance(self.size["num_cpus"], workers=self.size["workers"])
        except BaseException as e:  # noqa: BLE001 - re-raised by connect_ray in the main thread
            self.error = e
        finally:
            worker_log.removeFilter(quiet)
            self.started.set()
        self.release.wait()


class _NotMainThreadWarning(logging.Filter):
    """Drops Ray's warning that ``ray.init`` off the main thread sets no SIGTERM handler
    (:func:`start_ahead` sets the same one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_AHEAD: dict[str, _Start] = {}  # the start of this process's command, until stop_ahead


def start_ahead(cfg) -> bool:
    """Start the private instance a prune on Ray will attach to, on a thread; True if started.

    Nothing starts when the run attaches to a cluster (``ray_address`` or ``RAY_ADDRESS``), or
    Ray is already running in this process. Call from the main thread: it sets Ray's SIGTERM
    handler (exit, so that Ray is stopped), which ``ray.init`` sets only on the main thread.
    The caller must end with :func:`stop_ahead`.
    """
    if cfg.backend != "ray" or cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return False
    import ray  # here, not on the thread: the command imports torch meanwhile

    if ray.is_initialized() or "thread" in _AHEAD:
        return False
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    _AHEAD["thread"] = _Start(prune_instance(cfg))
    _AHEAD["thread"].start()
    return True


def stop_ahead() -> None:
    """End what :func:`start_ahead` started: stop its Ray if it is still running (no run took
    it, or the run left it running), then let the thread end. Nothing without a start ahead."""
    ahead = _AHEAD.pop("thread", None)
    if ahead is None:
        return
    ahead.started.wait()
    import ray

    try:
        if ahead.error is None and ray.is_initialized():
            ray.shutdown()
    finally:
        ahead.release.set()  # only now: Ray's processes die with this thread
        ahead.join()
