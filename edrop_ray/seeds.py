"""Independent random streams derived from the one run seed.

Every random draw of a run comes from a named stream: ``stream(seed, "energy_batch")`` for the
energy batches, ``stream(seed, "data_order", epoch)`` for one epoch's training order, and so on.
A stream's 64-bit seed is derived with :class:`numpy.random.SeedSequence`:
``SeedSequence(entropy=seed, spawn_key=(crc32(name), *index))``. SeedSequence hashes its entropy
and spawn key together (a mixing hash designed for this), so streams that differ in the seed, the
name or any index are unrelated — unlike ``seed + 1`` or ``seed * K + epoch``, where seed s's
second stream is seed s+1's first, or the energy batch of one generation was the start of an
epoch's training order. ``crc32`` turns the name into a spawn-key word; names are checked against
:data:`STREAMS`, so a typo cannot quietly make a new stream.

Changing a name, the derivation or what a stream is used for changes every run's draws: bump
:data:`STREAMS_VERSION`, which keys cached results (the dense baseline's cache). Adding a new
name changes no existing stream's draws and needs no bump.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["STREAMS", "STREAMS_VERSION", "stream", "stream_seed", "stream_seeds"]

STREAMS_VERSION = 2  # bump when a stream's derivation or use changes (keys cached results)

STREAMS = (
    "init",  # the weights' initialisation (torch's global generator)
    "population",  # the search's first population and its repair
    "trial",  # one member's trial in one generation: parents, mutation, crossover, repair
    "data_order",  # the training order, one permutation per epoch index
    "energy_batch",  # the batches on which generations are judged
    "data_split",  # the train/test split of the in-memory datasets
    "baseline_ranking",  # compare's random-score baseline
    "train_state",  # the sampled training state (train_state: sampled)
    "bn_recalibrate",  # the batch order of BatchNorm recalibration
    "dropout",  # the learner's own stream for dropout (torch's global generator, swapped in)
    "heldout_split",  # energy_source: heldout, the part of the training set kept for energies
    "probe",  # probe_members: the fixed random states judged beside the search (diagnostics)
)


def stream_seed(seed: int, name: str, *index: int) -> int:
    """The 64-bit seed of stream ``name`` (with optional non-negative ``index`` words, e.g. an
    epoch) of the run seed ``seed``. Same inputs, same seed; any different input, an unrelated
    seed."""
    return stream_seeds(seed, name, *index, count=1)[0]


def stream_seeds(seed: int, name: str, *index: int, count: int) -> list[int]:
    """``count`` unrelated 64-bit seeds of stream ``name`` (one per member of a population, say)
    from one hash: consecutive pairs of words of the stream's :class:`SeedSequence`. Seed ``k`` is
    the same whatever ``count`` beyond ``k`` asks for, so any process computes any member's;
    ``count=1`` is :func:`stream_seed`."""
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}; choose one of: {', '.join(STREAMS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in index):
        raise ValueError(f"stream indexes must be non-negative integers, got {index!r}")
    key = (zlib.crc32(name.encode()), *index)
    words = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(2 * count, np.uint32)
    words = words.astype(np.uint64).reshape(count, 2)
    # torch seeds are 64-bit; keep them below 2**63 so each is a valid signed int64 everywhere
    return ((words[:, 0] | words[:, 1] << np.uint64(32)) & np.uint64(2**63 - 1)).tolist()


def stream(seed: int, name: str, *index: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` on stream ``name`` of ``seed`` (see :func:`stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *index))
