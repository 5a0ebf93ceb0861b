"""Physical slimming of a masked model, parameter/MAC counts, and the saved pruned model.

Slimming removes every switched-off unit with Torch-Pruning, so that the slimmed network computes
exactly what the masked network computes. A coupled group whose units are all off cannot lose its
last channel (the layers would vanish); that one channel is kept with its output parameters set to
zero, so it still outputs exactly zero, and it is counted in the parameters honestly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from .models import build_model
from .units import Units, build_dependency

__all__ = ["slim_model", "count_params_macs", "kept_per_layer", "save_pruned", "load_pruned"]


def count_params_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(parameters, MACs of one sample) of ``model``."""
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs[:1])
    finally:
        model.train(was_training)
    return int(params), int(macs)


@torch.no_grad()
def _zero_unit_outputs(model: nn.Module, units: Units, unit: int) -> None:
    """Make ``unit`` output exactly zero by zeroing its parameters at every mask point."""
    modules = dict(model.named_modules())
    for name, unit_of in units.mask_points.items():
        channels = (unit_of == unit).nonzero().flatten()
        if channels.numel() == 0:
            continue
        module = modules[name]
        module.weight[channels] = 0
        if module.bias is not None:
            module.bias[channels] = 0


def slim_model(
    model: nn.Module, units: Units, state: torch.Tensor, example_inputs: torch.Tensor
) -> nn.Module:
    """A physically slimmed copy of ``model`` without the units that ``state`` ((D,) bool) drops.

    ``model`` itself is left untouched.
    """
    if state.shape != (units.num_units,):
        raise ValueError(f"state must have shape ({units.num_units},), got {tuple(state.shape)}")
    slim = copy.deepcopy(model).cpu().float()
    state = state.cpu().bool()
    plans: list[tuple[str, list[int]]] = []
    for group in units.groups:
        bits = state[group.offset : group.offset + group.size]
        off = (~bits).nonzero().flatten().tolist()
        if len(off) == group.size:
            off = off[1:]  # keep channel 0 of the group, silenced
            _zero_unit_outputs(slim, units, group.offset)
        if off:
            plans.append((group.root, off))
    if not plans:
        return slim
    graph = build_dependency(slim, example_inputs.cpu().float())
    modules = dict(slim.named_modules())
    for root_name, off in plans:
        root = modules[root_name]
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, off).prune()
    return slim


def kept_per_layer(units: Units, state: torch.Tensor) -> dict[str, float]:
    """Kept fraction of each coupled group, keyed by its root layer name."""
    state = state.cpu().bool()
    return {g.root: float(state[g.offset : g.offset + g.size].float().mean()) for g in units.groups}


def save_pruned(
    path: str | Path,
    slim: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    small_input: bool,
    state: torch.Tensor,
) -> None:
    """Save the slimmed model as plain tensors and its recipe (loads with ``weights_only=True``).

    The recipe (architecture, classes, input shape, mask) rebuilds the slimmed architecture; see
    :func:`load_pruned`.
    """
    torch.save(
        {
            "format": "edrop_ray.pruned/1",
            "model": model_name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "small_input": small_input,
            "mask": state.cpu().bool(),
            "state_dict": {k: v.cpu() for k, v in slim.state_dict().items()},
        },
        path,
    )


def load_pruned(path: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_pruned`: a runnable, physically slimmed ``nn.Module``."""
    from .units import discover_units  # local: only loading needs tracing

    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(
        blob["model"],
        num_classes=blob["num_classes"],
        in_channels=blob["in_channels"],
        small_input=blob["small_input"],
    )
    x = torch.zeros(2, blob["in_channels"], blob["input_size"], blob["input_size"])
    units = discover_units(model, x)
    slim = slim_model(model, units, blob["mask"], x)
    slim.load_state_dict(blob["state_dict"])
    return slim.eval()
