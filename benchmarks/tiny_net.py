"""A network that costs next to nothing to run: for measuring the control path alone, so that
the evaluators' compute, shared by many processes on a few cores, does not pass for it.

    --set model=tiny_net:build   (with benchmarks/ on PYTHONPATH)
"""

from __future__ import annotations

from torch import nn


def build(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )
