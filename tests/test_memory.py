"""The tool's processes keep freed CPU memory in their heap (edrop_ray.memory).

Each probe runs in a fresh interpreter: glibc's settings are per process and this one's heap has
a history. The probe mallocs a block (20 MB, or 64 MB: activations of a CPU energy pass, below
and above glibc's largest mapping threshold), writes it, frees it, and reads glibc's own
counters (mallinfo2)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from edrop_ray import cli, cluster
from edrop_ray.memory import worker_environment

SHARED_RAY = True  # the actor test runs on the session's Ray instance (tests/conftest.py)

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
size, where, seen = int(sys.argv[2]) << 20, sys.argv[3], []
def use():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    seen.append(libc.mallinfo2())
    libc.free(block)
    seen.append(libc.mallinfo2())
import threading
if where == "main":
    use()
else:  # on a thread started after the settings
    t = threading.Thread(target=use)
    t.start()
    t.join()
during, after = seen
libc.malloc_stats()  # glibc prints each arena ("Arena N:") to stderr
print(json.dumps({"applied": applied, "mapped_during": during.hblkhd,
                  "free_in_heap_after": after.fordblks}))
"""


def _probe(mode: str, size_mb: int = 20, where: str = "main", **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(size_mb), where],
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
        "MALLOC_MMAP_MAX_": 0,
        "MALLOC_MMAP_THRESHOLD_": 32 << 20,
        "MALLOC_TRIM_THRESHOLD_": 2**31 - 1,
        "MALLOC_TOP_PAD_": 64 << 20,
        "MALLOC_ARENA_MAX": 1,
    }
    assert kept["mapped_during"] < 20 << 20  # (blocks mapped by the imports before it stay)
    assert kept["free_in_heap_after"] >= 20 << 20


def test_a_users_own_allocator_setting_wins():
    # glibc reads MALLOC_MMAP_THRESHOLD_ itself at start; the tool must not override it (nor
    # turn mapping off under it)
    kept = _probe("keep", MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_MMAP_MAX_="65536")
    assert "MALLOC_MMAP_THRESHOLD_" not in kept["applied"]
    assert set(kept["applied"]) == {
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_ARENA_MAX",
    }
    assert kept["mapped_during"] >= 20 << 20  # the user's 1 MB threshold still maps it
    tuned = _probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert tuned["applied"] == {}
    assert tuned["mapped_during"] >= 20 << 20


def test_a_thread_started_after_it_uses_the_main_heap():
    # the block is malloc'd and freed on a new thread (as a model actor's compute thread is):
    # by default the thread gets an arena of its own, which may hand emptied heaps back
    default, kept = _probe("default", where="thread"), _probe("keep", where="thread")
    assert default["arenas"] == 2
    assert kept["arenas"] == 1
    assert kept["mapped_during"] < 20 << 20
    assert kept["free_in_heap_after"] >= 20 << 20


def test_the_cli_process_keeps_its_heap(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "keep_heap_memory", lambda: calls.append(1) or {})
    assert cli.main(["resume", str(tmp_path / "no-such-run")]) == 2  # a one-line error
    assert calls == [1]


def test_blocks_above_the_largest_mapping_threshold_stay_in_the_heap_too():
    # 64 MB: a ResNet-18 32 px activation of 256 samples, over glibc's 32 MB threshold ceiling
    default, kept = _probe("default", 64), _probe("keep", 64)
    assert default["mapped_during"] >= 64 << 20
    assert kept["mapped_during"] < 64 << 20
    assert kept["free_in_heap_after"] >= 64 << 20


def test_ray_workers_start_with_one_arena_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert worker_environment() == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_environment() == {}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert worker_environment() == {}


def test_a_private_instance_gets_it_and_the_driver_keeps_its_environment(monkeypatch):
    import ray

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(os.environ))
    cluster.start_private_instance(num_cpus=1)
    assert seen["MALLOC_ARENA_MAX"] == "1"  # what the raylet, and so every worker, inherits
    assert "MALLOC_ARENA_MAX" not in os.environ
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")  # the user's: passed on as it is
    cluster.start_private_instance(num_cpus=1)
    assert seen["MALLOC_ARENA_MAX"] == "3"
    assert os.environ["MALLOC_ARENA_MAX"] == "3"


def test_an_actors_compute_thread_keeps_its_blocks_on_a_private_instance(ray_cluster):
    # In a Ray worker, Ray's threads have made arenas before the actor's constructor runs; a
    # thread started later (an actor's compute thread) was handed one of them, and its blocks
    # over 64 MB were mapped afresh on every use. On the tool's private instance (as the
    # session's is started) the workers run with one arena from the start.
    import ray

    class Probe:
        def __init__(self):
            from edrop_ray.memory import keep_heap_memory

            keep_heap_memory()  # as the trainer and the evaluators do

        def faults_of_a_second_use(self, size: int) -> tuple[str | None, int]:
            import resource
            import threading

            libc = ctypes.CDLL(None)
            libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            libc.free.argtypes = [ctypes.c_void_p]
            faults = []

            def use():
                for _ in range(2):
                    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                    block = libc.malloc(size)
                    ctypes.memset(block, 1, size)
                    libc.free(block)
                    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

            t = threading.Thread(target=use)
            t.start()
            t.join()
            return os.environ.get("MALLOC_ARENA_MAX"), faults[1]

    probe = ray.remote(num_cpus=0)(Probe).remote()
    try:
        arena_max, faults = ray.get(probe.faults_of_a_second_use.remote(80 << 20), timeout=120)
    finally:
        ray.kill(probe)
    assert arena_max == "1"
    assert faults < 1000  # 80 MB is 20,480 pages: faulted in again, had it been handed back
