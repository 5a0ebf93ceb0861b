"""CPU memory of the tool's own processes: glibc keeps freed activations for reuse.

Only ``ctypes`` and ``os``: the CLI calls it before it imports torch.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_heap_memory", "HEAP_SETTINGS", "worker_environment"]

# glibc's mallopt parameters (malloc.h) and the values this tool's processes use; each is
# left alone when its environment variable (MALLOC_TRIM_THRESHOLD_, ...) is set.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
HEAP_SETTINGS = {
    # no block is mapped on its own, however large: activations over 32 MB (glibc's largest
    # threshold) come from the heap too. In process, a ResNet-18 32 px forward pass of 128
    # samples (an evaluator's share of the default config) faulted 35,000 pages a call with the
    # threshold alone and none with this; 7 % faster a call
    "MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0),
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest (if mapping is on)
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt's largest (an int)
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 64 << 20),
    # threads started from now on (a model actor's compute thread) share the main heap: in
    # process, an energy call on a compute thread with an arena of its own faulted 50,000
    # pages, against 11,000-18,000 in the main heap
    "MALLOC_ARENA_MAX": (_M_ARENA_MAX, 1),
}


def _glibc() -> ctypes.CDLL | None:
    """This process's C library, where it is glibc (musl and macOS lack ``gnu_get_libc_version``)
    and the user left its allocator's tunables alone; else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None  # the user tuned glibc's allocator: theirs wins
    return libc


def keep_heap_memory() -> dict[str, int]:
    """Have glibc keep freed CPU memory for reuse instead of handing it back to the kernel.

    torch's CPU tensors come straight from ``malloc``. With glibc's defaults the activations of
    every forward pass (up to tens of MB each) are returned to the kernel when freed (the heap
    is trimmed, or they were mapped on their own) and fault in again, zeroed page by page, on
    the next pass. Here: every block comes from a heap, however large (none is mapped on its
    own), a heap is never trimmed below 2 GB, and it grows 64 MB at a time. A process keeps its
    peak heap until it exits.

    Threads started after the call allocate from the main heap too (one arena), where no other
    arena exists yet. Where threads made arenas before the call (a Ray worker's do, before an
    actor's constructor runs), a later thread may be handed one of those, which still maps
    blocks too large for its 64 MB heaps and drops its emptied heaps: such processes need one
    arena from their start (:func:`worker_environment`).

    Called by the processes this tool owns (the CLI, the Ray actors, Tune trials), never by the
    Python API in a user's process. A no-op off glibc, and for each setting the user made
    (its environment variable, or any ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``: then
    none). Returns the settings applied, by name.
    """
    libc = _glibc()
    if libc is None:
        return {}
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, (param, value) in HEAP_SETTINGS.items():
        if name in os.environ:
            continue  # the user's own setting wins
        if mallopt(param, value) == 1:
            applied[name] = value
    return applied


def worker_environment() -> dict[str, str]:
    """Environment for the processes of a Ray instance this tool starts on this machine (its
    workers inherit the raylet's): one malloc arena from each process's first thread on.

    :func:`keep_heap_memory` runs in an actor's constructor, after Ray's threads made arenas of
    their own; the compute thread is then handed one of those, whose emptied heaps glibc maps
    afresh (an evaluator faulted about 20,000 pages a second through a run, against none with
    this). Empty off glibc, or when the user set ``MALLOC_ARENA_MAX`` or a ``glibc.malloc``
    tunable (theirs reach the workers as they are).
    """
    if _glibc() is None or "MALLOC_ARENA_MAX" in os.environ:
        return {}
    return {"MALLOC_ARENA_MAX": "1"}
