"""The tool's processes keep freed CPU memory in their heap (edrop_ray.memory).

Each probe runs in a fresh interpreter: glibc's settings are per process and this one's heap has
a history. The probe mallocs a 20 MB block (the size of an activation of a CPU energy pass),
writes it, frees it, and reads glibc's own counters (mallinfo2)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from edrop_ray import cli

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33+ only (mallinfo2)",
)

PROBE = """
import ctypes, json, sys
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = None
if sys.argv[1] == "keep":
    from edrop_ray.memory import keep_heap_memory
    applied = keep_heap_memory()
size, seen = 20 << 20, []
def use():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    seen.append(libc.mallinfo2())
    libc.free(block)
    seen.append(libc.mallinfo2())
if len(sys.argv) > 2:  # on a thread started after the settings
    import threading
    t = threading.Thread(target=use)
    t.start()
    t.join()
else:
    use()
during, after = seen
libc.malloc_stats()  # glibc prints each arena ("Arena N:") to stderr
print(json.dumps({"applied": applied, "mapped_during": during.hblkhd,
                  "free_in_heap_after": after.fordblks}))
"""


def _probe(mode: str, *where: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *where],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {**json.loads(out.stdout), "arenas": out.stderr.count("Arena ")}


def test_freed_activations_stay_in_the_heap_for_reuse():
    default = _probe("default")
    kept = _probe("keep")
    # glibc's defaults: the block is mapped on its own and handed back when freed
    assert default["mapped_during"] >= 20 << 20
    assert default["free_in_heap_after"] < 20 << 20
    # kept: it came from the heap, and the heap still holds it after the free
    assert kept["applied"] == {
        "MALLOC_MMAP_THRESHOLD_": 32 << 20,
        "MALLOC_TRIM_THRESHOLD_": 2**31 - 1,
        "MALLOC_TOP_PAD_": 64 << 20,
        "MALLOC_ARENA_MAX": 1,
    }
    assert kept["mapped_during"] < 20 << 20  # (blocks mapped by the imports before it stay)
    assert kept["free_in_heap_after"] >= 20 << 20


def test_a_users_own_allocator_setting_wins():
    # glibc reads MALLOC_MMAP_THRESHOLD_ itself at start; the tool must not override it
    kept = _probe("keep", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert "MALLOC_MMAP_THRESHOLD_" not in kept["applied"]
    assert set(kept["applied"]) == {"MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"}
    assert kept["mapped_during"] >= 20 << 20  # the user's 1 MB threshold still maps it
    tuned = _probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert tuned["applied"] == {}
    assert tuned["mapped_during"] >= 20 << 20


def test_a_thread_started_after_it_uses_the_main_heap():
    # the block is malloc'd and freed on a new thread (as a model actor's compute thread is):
    # by default the thread gets an arena of its own, which may hand emptied heaps back
    default, kept = _probe("default", "thread"), _probe("keep", "thread")
    assert default["arenas"] == 2
    assert kept["arenas"] == 1
    assert kept["mapped_during"] < 20 << 20
    assert kept["free_in_heap_after"] >= 20 << 20


def test_the_cli_process_keeps_its_heap(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "keep_heap_memory", lambda: calls.append(1) or {})
    assert cli.main(["resume", str(tmp_path / "no-such-run")]) == 2  # a one-line error
    assert calls == [1]
