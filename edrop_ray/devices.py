"""Where a process computes: its device and its CPU threads.

One place for what the CLI, the Ray actors and the Tune trials each decided on their own: the
driver resolves ``device`` from the config (``auto`` = CUDA when present); a process that Ray placed
takes the GPU Ray gave it, if any; torch's CPU threads are set explicitly, because float sums, and
so the masks bit for bit, depend on their number.
"""

from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["resolve_device", "worker_device", "set_cpu_threads"]


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


def set_cpu_threads(threads: int, cpus: float) -> None:
    """torch's CPU threads: ``threads`` when set (the config's ``cpu_threads``), else the CPUs the
    process was given (at least one)."""
    torch.set_num_threads(threads or max(1, int(cpus)))
