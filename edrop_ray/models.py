"""The model grid of the paper (torchvision classifiers) adapted to small inputs.

torchvision's classifiers are built for 3x224x224 inputs. For 28-32 px inputs with 1 or 3
channels we swap the first convolution for a 3x3 stride-1 one with the right input channels
(the usual CIFAR-style stem), from outside: torchvision's code is never edited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torchvision import models as tvm

from .errors import UserError
from .masking import Masker
from .units import Units, discover_units

if TYPE_CHECKING:
    from .config import Config
    from .data import DataInfo

__all__ = ["MODELS", "build_model", "example_input", "Replica", "build_replica", "replica_of"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "alexnet": tvm.alexnet,
    "squeezenet1_0": tvm.squeezenet1_0,
    "squeezenet1_1": tvm.squeezenet1_1,
}


def _small_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    # 3x3, stride 1, padding 1: a 32 px image keeps its resolution through the stem.
    return nn.Conv2d(
        in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None
    )


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, small_input: bool = True
) -> nn.Module:
    """Build a torchvision classifier with ``num_classes`` outputs, adapted to small inputs.

    With ``small_input`` the stem convolution becomes 3x3 stride 1 over ``in_channels``; the
    ResNet stem max-pool is kept (it halves 32 px to 16 px, which keeps CPU runs affordable).
    Without it, only the input channels are changed.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    model = MODELS[name](weights=None, num_classes=num_classes)
    if name.startswith("resnet"):
        stem = model.conv1
        model.conv1 = (
            _small_conv(stem, in_channels)
            if small_input
            else nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        )
    else:  # alexnet and squeezenet keep their stem at features[0]
        stem = model.features[0]
        model.features[0] = (
            _small_conv(stem, in_channels)
            if small_input
            else nn.Conv2d(
                in_channels,
                stem.out_channels,
                stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
            )
        )
    return model


def example_input(in_channels: int, input_size: int, batch: int = 2) -> torch.Tensor:
    """A deterministic dummy batch (batch, C, H, W) for tracing and counting."""
    return torch.zeros(batch, in_channels, input_size, input_size)


class Replica(NamedTuple):
    """A model ready for EDropout on one device: its units and its masking hooks."""

    model: nn.Module
    units: Units
    masker: Masker
    example: torch.Tensor  # (2, C, H, W) zeros on the CPU, for tracing and counting
    memory_format: torch.memory_format


def build_replica(cfg: Config, info: DataInfo, device: torch.device) -> Replica:
    """The run's model on ``device`` (channels-last if configured), its units found by tracing on
    the CPU, and a :class:`Masker` on it. The trainer and every evaluator build theirs here, so
    their models, units and hooks are the same. Seed torch first for reproducible weights."""
    model = build_model(
        cfg.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        small_input=cfg.small_input,
    )
    return replica_of(model, example_input(info.in_channels, cfg.input_size), cfg, device)


def replica_of(
    model: nn.Module, example: torch.Tensor, cfg: Config, device: torch.device
) -> Replica:
    """:func:`build_replica` for a model that already exists (a user's own, with its weights):
    its units traced on the CPU with ``example`` (a CPU batch), then moved to ``device``."""
    model = model.to("cpu")
    units = discover_units(model, example)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    return Replica(model, units, Masker(model, units), example, fmt)
