"""Where a process computes: its device and its CPU threads.

One place for what the CLI, the Ray actors and the Tune trials each decided on their own: the
driver resolves ``device`` from the config (``auto`` = CUDA when present); a process that Ray placed
takes the GPU Ray gave it, if any; torch's CPU threads are set explicitly, because float sums, and
so the masks bit for bit, depend on their number; and a model actor computes on one thread of its
own (:class:`ComputeThread`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, TypeVar

import torch
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .errors import UserError

__all__ = ["resolve_device", "worker_device", "cpu_threads", "ComputeThread", "computes"]

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """The driver's device: ``auto`` is CUDA when present, else the CPU; ``cuda[:N]`` without a
    visible GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} asked for but no CUDA GPU is visible; use --set device=auto"
        )
    return torch.device(name)


def worker_device(name: str) -> torch.device:
    """The device of a process Ray placed (an actor, a Tune trial): the GPU Ray gave it when the
    config allows one, else the CPU.

    Ray makes exactly the assigned GPUs visible (``CUDA_VISIBLE_DEVICES``), so the worker uses
    its first visible GPU whatever ``cuda:N`` meant on the driver; without a GPU of its own (or
    with only a logical one on a CPU machine) it runs on the CPU.
    """
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def cpu_threads(threads: int, cpus: float) -> int:
    """torch's CPU threads for a process: ``threads`` when set (the config's ``cpu_threads``),
    else the CPUs the process was given (at least one)."""
    return threads or max(1, int(cpus))


class ComputeThread:
    """One thread that does all of a process's torch work, whichever thread asks for it.

    torch's CPU kernels run on OpenMP (libgomp on Linux), which keeps a team of worker threads
    for every thread that starts a parallel region. While a process holds more such threads
    than it has CPUs, libgomp stops spinning between regions (100 spins instead of 300,000,
    ``GOMP_SPINCOUNT``), and every region then wakes its workers through the kernel. A Ray
    actor with concurrency groups runs ``__init__`` on its main thread and each group on a
    thread of its own, so a trainer that builds its model on one, trains on a second and
    copies weights for a broadcast on a third keeps three teams: on 2 CPUs its training step
    took 7-10 % longer than the same step on one thread (README, "Benchmarks").

    So this thread computes with ``threads`` torch threads, and every other thread of the
    process with one (no team): the thread that makes it, and, as torch's default, every
    thread that starts its first parallel work after that (Ray's concurrency groups).

    ``run(fn, ...)`` runs ``fn`` here and returns its result (or raises its error) to the
    caller, under the caller's torch dispatch and function modes, as if called in place (a
    test's device guard applies here too); called from this thread, it runs in place.
    """

    def __init__(self, threads: int, name: str = "torch-compute"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident = self._pool.submit(_own_threads, threads).result()
        torch.set_num_threads(1)  # this thread's, and the default of threads yet to start
        _LIVE.add(self)

    def close(self) -> None:
        """End the thread (after the work queued for it); ``run`` refuses afterwards."""
        self._pool.shutdown(wait=True)

    @staticmethod
    def close_all() -> None:
        """End every compute thread of this process: for a process that made them in place
        (the tests) and must not leave them to the interpreter's exit."""
        for compute in list(_LIVE):
            compute.close()

    @property
    def ident(self) -> int:
        return self._ident

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        modes = [*_get_current_function_mode_stack(), *_get_current_dispatch_mode_stack()]
        return self._pool.submit(_under, modes, fn, args, kwargs).result()


_LIVE: weakref.WeakSet[ComputeThread] = weakref.WeakSet()


def _own_threads(threads: int) -> int:
    # torch takes a thread's OpenMP settings from the process's default at its first parallel
    # work (or first ask); ask now, so that this thread keeps its own when the default changes
    torch.get_num_threads()
    torch.set_num_threads(threads)
    return threading.get_ident()


def _under(modes: list, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    with ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        return fn(*args, **kwargs)


def computes(method: Callable[..., T]) -> Callable[..., T]:
    """Run an actor's method on its :class:`ComputeThread` (``self.compute``)."""

    @functools.wraps(method)
    def on_compute_thread(self, *args: Any, **kwargs: Any) -> T:
        return self.compute.run(method, self, *args, **kwargs)

    return on_compute_thread
