"""What a model needs to know about a dataset (:class:`DataInfo`), in a module of its own.

The actors receive a ``DataInfo`` with every model they build; unpickling it imports this module
only, not :mod:`edrop_ray.data`, whose dataset classes import torchvision (seconds of CPU per
process, most of it ``torch._dynamo``). :mod:`edrop_ray.data` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataInfo"]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    train_size: int
    test_size: int
