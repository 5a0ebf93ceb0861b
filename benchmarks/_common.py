"""Flags and helpers every benchmark script shares."""

from __future__ import annotations

import argparse

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
        from pathlib import Path

        Path(out).write_text(text + "\n")
