"""Attaching to Ray: the one place ``ray.init`` is called (Ray is imported on first use).

Both ways of running on Ray, the Ray backend of a prune (:mod:`edrop_ray.distributed.runner`) and
a Tune sweep (:mod:`edrop_ray.tune`), attach the same way: to Ray if it is already running in this
process, else to the given address (the config's ``ray_address``, else ``RAY_ADDRESS``), else to a
new private instance on this machine (no dashboard; logs stay in Ray's session folder).
"""

from __future__ import annotations

import os

__all__ = ["connect_ray", "PRIVATE_INSTANCE", "start_private_instance"]

# How a private instance starts: no dashboard, workers' logs kept in Ray's session folder.
# Ray's workers keep its default niceness (15): at nice 0 the actors booted during a CPU dense
# baseline but slowed it by as much, and runs were no faster (README, Benchmarks).
PRIVATE_INSTANCE = {"include_dashboard": False, "log_to_driver": False}


def connect_ray(address: str | None, *, num_cpus: int, logging_level: int | None = None) -> bool:
    """Attach to Ray; True when this call started it (and so should stop it at the end).

    ``address``: a cluster's address, or None/empty for ``RAY_ADDRESS`` or, without it, a new
    local instance with ``num_cpus`` logical CPUs. ``logging_level``: Ray's, when given.
    """
    import ray

    if ray.is_initialized():
        return False
    logging = {} if logging_level is None else {"logging_level": logging_level}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, **logging)
        return False
    start_private_instance(num_cpus, **logging)
    return True


def start_private_instance(num_cpus: int, **options) -> None:
    """``ray.init`` a new instance on this machine, as the tool starts its own (the tests and
    benchmarks too): :data:`PRIVATE_INSTANCE`, and Ray's processes started with
    :func:`~edrop_ray.memory.worker_environment` (the driver's environment is left as it was)."""
    import ray

    from .memory import worker_environment

    env = worker_environment()  # only variables the driver's environment does not set
    os.environ.update(env)  # the raylet copies it, and starts the workers with it
    try:
        ray.init(num_cpus=num_cpus, **PRIVATE_INSTANCE, **options)
    finally:
        for name in env:
            del os.environ[name]
