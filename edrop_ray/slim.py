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

from .errors import UserError
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
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Save the slimmed model as plain tensors and its recipe (loads with ``weights_only=True``).

    The recipe (architecture, classes, input shape, mask) rebuilds the slimmed architecture; see
    :func:`load_pruned`. ``input_shape`` (one sample's, e.g. (C, H, W)) is recorded for a
    user's own model, whose architecture is no name of the grid.
    """
    blob = {
        "format": "edrop_ray.pruned/1",
        "model": model_name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "small_input": small_input,
        "mask": state.cpu().bool(),
        "state_dict": {k: v.cpu() for k, v in slim.state_dict().items()},
    }
    if input_shape is not None:
        blob["input_shape"] = [int(n) for n in input_shape]
    torch.save(blob, path)


def load_pruned(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned`: a runnable, physically slimmed ``nn.Module``.

    A run of a user's own network (:func:`edrop_ray.prune`; its ``model`` is ``custom:<class>``)
    names no architecture of the grid: pass ``model``, an instance of the same network (its
    weights do not matter), and it is slimmed by the saved mask and given the saved weights.
    """
    from .units import discover_units  # local: only loading needs tracing

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if model is None:
        if str(blob["model"]).startswith("custom:"):
            raise UserError(
                f"{str(path)!r} holds your own network {blob['model'][7:]!r}, not one of the "
                "grid: load it with edrop_ray.slim.load_pruned(path, model=<a new instance>)"
            )
        model = build_model(
            blob["model"],
            num_classes=blob["num_classes"],
            in_channels=blob["in_channels"],
            small_input=blob["small_input"],
        )
    else:
        model = copy.deepcopy(model).cpu().float()
    shape = blob.get("input_shape") or [blob["in_channels"], blob["input_size"], blob["input_size"]]
    x = torch.zeros(2, *shape)
    units = discover_units(model, x)
    slim = slim_model(model, units, blob["mask"], x)
    slim.load_state_dict(blob["state_dict"])
    return slim.eval()
