"""Your own network and data set, pruned by import path (see examples/ray_job.sh).

    python -m edrop_ray prune --set model=examples.user_model:make \\
        --set dataset=examples.user_model:digits --set input_size=8 --backend local

``make`` is called as ``make(num_classes=..., in_channels=...)`` and returns an ``nn.Module``;
``digits`` is called with no arguments and returns ``(train, test)`` map-style datasets of
``(image (C, H, W) float, label int)``. EDropout finds the prunable channels by tracing, so the
concatenation below couples its two branches' channels with the next layer's input slices, and
the depthwise convolution's channels with the convolution that feeds it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class TwoBranchNet(nn.Module):
    """A stem, two branches joined by torch.cat, a depthwise-separable block and a classifier."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.left = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.depthwise = nn.Sequential(  # groups == channels: one filter per channel
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(self.depthwise(x))


def make(num_classes: int, in_channels: int) -> nn.Module:
    """The model factory: ``model=examples.user_model:make``."""
    return TwoBranchNet(num_classes, in_channels)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits, 1 channel, split 80/20 with a fixed seed, standardised with the
    training part's statistics: ``dataset=examples.user_model:digits`` with ``input_size=8``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    mean, std = images[train].mean(), images[train].std()
    return (
        TensorDataset((images[train] - mean) / std, labels[train]),
        TensorDataset((images[test] - mean) / std, labels[test]),
    )
