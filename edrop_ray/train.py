"""Masked training step and Top-1/Top-5 evaluation (plain PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .masking import Masker

__all__ = ["train_step", "evaluate", "build_optimizer", "build_scheduler"]


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, the optimiser of the paper's ResNet experiments."""
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=momentum > 0,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule, stepped once after every optimiser step; None = constant.

    ``cosine`` anneals from the configured lr to 0 over ``total_steps``: optimiser step t
    (0-based) runs at ``lr * 0.5 * (1 + cos(pi * t / total_steps))``. The closed form of a
    LambdaLR, not CosineAnnealingLR's recursive update, so the lr of a step depends on t alone.
    """
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    masker: Masker | None,
    state: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp: str = "none",
) -> float:
    """One step of backprop on (x, y) with ``state`` ((D,) bool) applied; returns the loss.

    A switched-off unit outputs zero, so its weights get zero gradient. state=None trains dense.
    """
    model.train()
    if masker is not None:
        masker.set_states(state)
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        if masker is not None:
            masker.set_states(None)
    return float(loss.detach())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    masker: Masker | None = None,
    state: torch.Tensor | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 and Top-5 accuracy (in %) and mean loss of ``model`` (with ``state`` if given)."""
    was_training = model.training
    model.eval()
    if masker is not None:
        masker.set_states(state)
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            seen += y.numel()
    finally:
        if masker is not None:
            masker.set_states(None)
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluation set is empty")
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "loss": loss_sum / seen,
    }
