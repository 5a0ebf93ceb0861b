"""Apply one or many pruning states to a model with forward hooks, never copying it.

A :class:`Masker` registers one hook per mask point (see :mod:`edrop_ray.units`). With S states
set, the batch is expected to hold S replicas stacked on the batch axis (S*B samples); replica s
is multiplied by state s's 0/1 channel mask at every mask point, so S candidates are judged in one
forward pass. A switched-off channel is exactly zero after its BatchNorm, and therefore gets zero
gradient in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .units import Units

__all__ = ["Masker"]


class Masker:
    """Hooks that multiply the output channels of the mask points by the current states.

    With no states set the hooks return at once and the model runs dense. The states may live on
    any device (the search keeps them on the CPU): the masks are built where they meet the
    activations, on the activation's device and in its dtype (bf16 under autocast), once per
    :meth:`set_states` and per (device, dtype), and then reused by every mask point and pass.
    """

    def __init__(self, model: nn.Module, units: Units):
        self.units = units
        self._states: torch.Tensor | None = None
        # (device, dtype) -> mask point -> (S, C) mask; emptied by every set_states
        self._masks: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._index: dict[torch.device, dict[str, torch.Tensor]] = {}
        modules = dict(model.named_modules())
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in units.mask_points
        ]

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs, out: torch.Tensor):
            if self._states is None:
                return None
            mask = self._masks_for(out)[name]
            n_states = mask.shape[0]
            # (S*B, C, ...) -> (S, B, C, ...) times (S, 1, C, 1, ...)
            shaped = out.view(n_states, -1, *out.shape[1:])
            m = mask.view(n_states, 1, mask.shape[1], *([1] * (out.dim() - 2)))
            if torch.is_grad_enabled():
                return (shaped * m).view(out.shape)
            shaped.mul_(m)  # no autograd to protect: save the extra activation-sized tensor
            return None

        return hook

    def _masks_for(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        # Where the states meet an activation: one copy of the (S, D) states to its device and
        # dtype, then one gather per mask point, all on that device.
        key = (out.device, out.dtype)
        masks = self._masks.get(key)
        if masks is None:
            keep = self._states.to(device=out.device, dtype=out.dtype)
            index = self._index_on(out.device)
            masks = self._masks[key] = {n: keep[:, unit_of] for n, unit_of in index.items()}
        return masks

    def set_states(self, states: torch.Tensor | None) -> None:
        """Use ``states`` ((S, D) or (D,) bool, on any device) for the following forward passes;
        None = dense."""
        self._masks = {}
        if states is None:
            self._states = None
            return
        if states.dim() == 1:
            states = states[None]
        if states.shape[1] != self.units.num_units:
            raise ValueError(
                f"state has {states.shape[1]} bits, model has {self.units.num_units} units"
            )
        self._states = states

    def _index_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        # The channel -> unit maps, copied to a device once rather than on every call.
        if device not in self._index:
            self._index[device] = {
                name: unit_of.to(device) for name, unit_of in self.units.mask_points.items()
            }
        return self._index[device]

    @contextmanager
    def applied(self, states: torch.Tensor | None) -> Iterator[None]:
        """Context manager: ``states`` on inside, dense again after."""
        self.set_states(states)
        try:
            yield
        finally:
            self.set_states(None)

    def remove(self) -> None:
        """Remove the hooks: the model is exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.set_states(None)
