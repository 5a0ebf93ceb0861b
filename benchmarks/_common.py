"""Flags and helpers every benchmark script shares."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--threads and --seed."""
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared box, extra threads mostly measure contention)",
    )
    p.add_argument("--seed", type=int, default=0)


def csv(kind):
    """argparse type for a comma-separated list of ``kind``."""
    return lambda text: [kind(v) for v in text.split(",") if v]


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: the clock must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(text: str, out: str) -> None:
    """Print a benchmark's tables, and write them to ``out`` too when given."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid`` (by their parent pids in /proc): the processes
    a benchmark started, found without matching any name."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # ended between the listing and the read
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process of this machine has run, all its threads, to the nanosecond
    (Linux schedstat; /proc/PID/stat counts in 10 ms ticks, too coarse for one generation)."""
    if pid == os.getpid():
        return time.process_time()
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended between the listing and the read
    return total / 1e9
