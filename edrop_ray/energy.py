"""Energies of many pruning states on one mini-batch, batched into few forward passes.

The energy of a state is the mean cross-entropy of the network with that state applied,
computed without gradients and with BatchNorm in inference mode (running statistics), so that
every candidate of a generation is judged on the same batch with the same weights. Optionally
``sparsity_lambda * kept_fraction(state)`` is added to steer the pruning rate, and
``macs_lambda * macs(state) / macs(dense)`` (:func:`macs_penalty`, added by the search, which holds
the exact count of :mod:`edrop_ray.budget`) to steer the compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masking import Masker

__all__ = ["compute_energies", "compute_energies_looped", "macs_penalty"]


def macs_penalty(states: torch.Tensor, counter, macs_lambda: float) -> torch.Tensor:
    """(N,) float32 ``macs_lambda * macs(state) / macs(dense)`` of (N, D) states, counted
    exactly on the slimmed model by ``counter`` (a :class:`edrop_ray.budget.Counter`)."""
    return (macs_lambda * counter.fractions(states)[1]).float()


def _autocast(device: torch.device, amp: str):
    enabled = amp == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# On a CPU the convolutions are compute-bound already at a few hundred samples, and bigger
# passes only spill the caches (measured in benchmarks/bench_energy.py); a GPU wants everything.
_CPU_SAMPLES_PER_PASS = 256


def _auto_per_pass(x: torch.Tensor, n_states: int) -> int:
    if x.device.type == "cpu":
        return max(1, min(n_states, _CPU_SAMPLES_PER_PASS // max(1, x.shape[0])))
    return n_states


@torch.no_grad()
def compute_energies(
    model: nn.Module,
    masker: Masker,
    states: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    states_per_pass: int = 0,
    sparsity_lambda: float = 0.0,
    amp: str = "none",
) -> torch.Tensor:
    """Energy of every state on the batch (x, y).

    states: (N, D) bool. x: (B, C, H, W) on the model's device; y: (B,) long.
    states_per_pass: how many states share one forward pass (their replicas of the batch are
    stacked); 0 = auto: all N at once on a GPU, about 256 samples per pass on a CPU.
    Returns (N,) float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    n_states, batch = states.shape[0], x.shape[0]
    if n_states == 0:
        return torch.empty(0)
    per_pass = states_per_pass if states_per_pass > 0 else _auto_per_pass(x, n_states)
    # The batch replicated once for a full pass; a shorter last pass uses the front of it.
    xs_all = x.repeat(min(per_pass, n_states), *([1] * (x.dim() - 1)))
    ys_all = y.repeat(min(per_pass, n_states))
    parts: list[torch.Tensor] = []
    try:
        for start in range(0, n_states, per_pass):
            chunk = states[start : start + per_pass]  # the masker moves it to the activations
            k = chunk.shape[0]
            masker.set_states(chunk)
            with _autocast(x.device, amp):
                logits = model(xs_all[: k * batch])  # replica s is judged with state s
            loss = F.cross_entropy(logits.float(), ys_all[: k * batch], reduction="none")
            parts.append(loss.view(k, batch).mean(dim=1))
    finally:
        masker.set_states(None)
        model.train(was_training)
    out = torch.cat(parts).cpu()  # one device -> host copy for the whole batch of states
    if sparsity_lambda:
        out += sparsity_lambda * states.float().mean(dim=1).cpu()
    return out


def compute_energies_looped(
    model: nn.Module,
    masker: Masker,
    states: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sparsity_lambda: float = 0.0,
    amp: str = "none",
) -> torch.Tensor:
    """One forward pass per state: the baseline the batched version is measured against."""
    return compute_energies(
        model, masker, states, x, y, states_per_pass=1, sparsity_lambda=sparsity_lambda, amp=amp
    )
