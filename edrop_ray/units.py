"""Unit discovery: one bit per coupled prunable channel, found by tracing the model.

Torch-Pruning's ``DependencyGraph`` traces one forward pass and groups the channels the graph
ties together (a conv's output, its BatchNorm, the next layer's input slice, every branch of a
residual addition). Each channel of such a group is one *unit*. The classifier's class outputs are
never units. Nothing here knows an architecture by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import torch_pruning as tp

__all__ = [
    "UnitGroup",
    "Units",
    "discover_units",
    "check_fits",
    "find_classifier",
    "build_dependency",
]

_PRUNABLE = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class UnitGroup:
    """One coupled group: ``size`` units numbered ``offset .. offset + size - 1``.

    root: name of the conv/linear whose output channels define the group (Torch-Pruning's root).
    layers: names of every conv/linear/BN whose output channels belong to the group.
    """

    root: str
    offset: int
    size: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Units:
    """All units of a model.

    groups:      the coupled groups, in a fixed order; units are numbered group by group.
    num_units:   D, the length of a pruning state.
    mask_points: module name -> (C,) long tensor giving the unit of each output channel.
                 These are the places where a state is applied: a BatchNorm when one follows the
                 conv (else its shift would switch the channel back on), otherwise the conv/linear.
    channel_units: the same map for every conv/linear/BN whose output channels are units.
    """

    groups: tuple[UnitGroup, ...]
    num_units: int
    mask_points: dict[str, torch.Tensor]
    channel_units: dict[str, torch.Tensor]

    def layer_of_units(self) -> list[str]:
        """Root layer name of every unit, length D."""
        return [g.root for g in self.groups for _ in range(g.size)]

    def __reduce__(self):
        # Pickled compactly (the driver ships its units to every actor, inline in the actor's
        # creation call): a layer whose channels are consecutive units, as nearly all are, is
        # its first unit and its width, not a long per channel (ResNet-50: 459 kB -> a few kB).
        wire = {name: _compact(unit_of) for name, unit_of in self.channel_units.items()}
        return _from_wire, (self.groups, self.num_units, tuple(self.mask_points), wire)


def _compact(unit_of: torch.Tensor) -> tuple[int, int] | torch.Tensor:
    first, n = int(unit_of[0]), unit_of.numel()
    if torch.equal(unit_of, torch.arange(first, first + n)):
        return first, n
    return unit_of


def _from_wire(groups, num_units, mask_names, wire) -> Units:
    channel_units = {
        name: torch.arange(u[0], u[0] + u[1]) if isinstance(u, tuple) else u
        for name, u in wire.items()
    }
    return Units(groups, num_units, {n: channel_units[n] for n in mask_names}, channel_units)


def find_classifier(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The classifier layer: the last conv/linear to run in a forward pass.

    Its output channels are the classes, so they are never units (holds for every torchvision
    classifier, including SqueezeNet whose classifier is a 1x1 conv).
    """
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example_inputs)
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("model has no Conv2d or Linear layer to prune")
    return order[-1]


def build_dependency(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` once with Torch-Pruning (BN statistics are left untouched)."""
    # imported here, not at the top: it pulls in torchvision (and torch._dynamo), seconds of
    # CPU that a process holding only states (the coordinator) never needs
    import torch_pruning as tp

    was_training = model.training
    model.eval()  # tracing runs a forward pass; eval keeps BN running stats unchanged
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)


def discover_units(model: nn.Module, example_inputs: torch.Tensor) -> Units:
    """Find every coupled prunable channel of ``model`` by tracing it on ``example_inputs``."""
    names = {m: n for n, m in model.named_modules()}
    classifier = find_classifier(model, example_inputs)
    graph = build_dependency(model, example_inputs)

    groups: list[UnitGroup] = []
    channel_units: dict[str, torch.Tensor] = {}
    mask_names: list[str] = []
    offset = 0
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=_PRUNABLE):
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        layers: list[str] = []
        for item in group:
            dep = item.dep
            module = dep.target.module
            if not (graph.is_out_channel_pruning_fn(dep.handler) and module in names):
                continue
            if not isinstance(module, _PRUNABLE + _NORMS):
                continue
            name = names[module]
            layers.append(name)
            unit_of = channel_units.setdefault(
                name, torch.full((_out_channels(module),), -1, dtype=torch.long)
            )
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            if bool((unit_of[idxs] >= 0).any()):
                raise ValueError(f"channel of {name} belongs to two coupled groups")
            unit_of[idxs] = offset + torch.as_tensor(item.root_idxs, dtype=torch.long)
            # Mask after the norm: a conv feeding a BatchNorm is masked at the BatchNorm.
            feeds_norm = any(isinstance(out.module, _NORMS) for out in dep.target.outputs)
            if not (isinstance(module, _PRUNABLE) and feeds_norm):
                mask_names.append(name)
        groups.append(UnitGroup(root=names[root], offset=offset, size=size, layers=tuple(layers)))
        offset += size

    for name, unit_of in channel_units.items():
        if bool((unit_of < 0).any()):
            raise ValueError(f"some output channels of {name} belong to no unit")
    return Units(
        groups=tuple(groups),
        num_units=offset,
        mask_points={n: channel_units[n] for n in dict.fromkeys(mask_names)},
        channel_units=channel_units,
    )


def check_fits(units: Units, model: nn.Module) -> None:
    """Raise ValueError unless every layer ``units`` names is in ``model``, a conv, linear or
    BatchNorm with the output channels the units give it: units traced elsewhere (another
    process's copy of the model) fit this copy."""
    modules = dict(model.named_modules())
    for name, unit_of in units.channel_units.items():
        module = modules.get(name)
        if not isinstance(module, _PRUNABLE + _NORMS):
            raise ValueError(f"the units name layer {name!r}, which this model has not")
        if _out_channels(module) != unit_of.numel():
            raise ValueError(
                f"the units give layer {name!r} {unit_of.numel()} output channels; "
                f"this model's has {_out_channels(module)}"
            )


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features
