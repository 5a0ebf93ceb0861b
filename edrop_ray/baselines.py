"""Structured pruning baselines: rank the units, remove the lowest, fit a parameter count.

Used by ``edrop-ray compare`` (:mod:`edrop_ray.compare`) for its **magnitude** and **random** arms
and its **random-mask** control. Plain PyTorch and Torch-Pruning, no Ray.

Ranking. Both baselines prune the units of :mod:`edrop_ray.units` (so they share EDropout's
definition of a prunable channel exactly) and slim with :func:`edrop_ray.slim.slim_model`. The
magnitude score of a unit is Torch-Pruning's group L1 norm,
``tp.importance.GroupMagnitudeImportance(p=1)`` with its defaults: the L1 norm of the unit's
channel in every layer of its coupled group (conv/linear output rows, BatchNorm scales and the
input slices of the layers that consume it), averaged over those layers and divided by the
group's mean so that groups of different layers compare. Units are removed globally, smallest
score first; the random baseline uses a seeded random score instead. Each coupled group keeps its
highest-scored unit, so no layer (or residual stream) is removed whole.

Parameter budget. The number of removed units is found by bisection on the exact parameter
count of the slimmed model (parameters only fall as units are removed), taking whichever of the
two bracketing counts is closer to EDropout's ``params_pruned``; one unit is the resolution.

Training them. :func:`dense_until` trains the dense model to the step pruning starts,
:func:`finetune` trains a slimmed model from that step to the end of the budget (a
:class:`~edrop_ray.learner.Learner` given the model and a fresh optimiser, unmasked), and
:func:`count_steps` counts the optimiser steps each arm really takes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import Config
from .learner import Learner
from .seeds import stream
from .slim import slim_model
from .train import build_optimizer
from .units import Units, build_dependency, find_classifier

__all__ = [
    "group_l1_scores",
    "random_scores",
    "prune_order",
    "state_without",
    "fit_param_count",
    "prune_to_params",
    "count_steps",
    "finetune",
    "dense_until",
]

PRUNABLE = (nn.Conv2d, nn.Linear)  # the layer types whose output channels are units


def group_l1_scores(model: nn.Module, units: Units, example_inputs: torch.Tensor) -> torch.Tensor:
    """(D,) group-L1 importance of every unit of ``model`` (see the module doc).

    The coupled groups are traced exactly as :func:`edrop_ray.units.discover_units` traces them,
    and are checked against ``units`` group by group.
    """
    model = model.cpu().float()
    example_inputs = example_inputs.cpu().float()
    names = {m: n for n, m in model.named_modules()}
    classifier = find_classifier(model, example_inputs)
    graph = build_dependency(model, example_inputs)
    groups = list(graph.get_all_groups(ignored_layers=[classifier], root_module_types=PRUNABLE))
    if len(groups) != len(units.groups):
        raise ValueError(f"model has {len(groups)} coupled groups, units have {len(units.groups)}")
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    scores = torch.zeros(units.num_units)
    for group, unit_group in zip(groups, units.groups, strict=True):
        root = names[group[0].dep.target.module]
        if root != unit_group.root or len(group[0].idxs) != unit_group.size:
            raise ValueError(
                f"coupled group of {root!r} does not match the units' {unit_group.root!r}"
            )
        imp = importance(group)
        if imp is not None:
            sl = slice(unit_group.offset, unit_group.offset + unit_group.size)
            scores[sl] = imp.detach().float().cpu()
    return torch.nan_to_num(scores, nan=0.0)  # an all-zero group (0/0) ranks lowest


def prune_order(scores: torch.Tensor, units: Units) -> torch.Tensor:
    """Units in the order they are removed: lowest score first, ties by unit number.

    The highest-scored unit of each coupled group is left out: it is never removed.
    """
    keep = torch.zeros(units.num_units, dtype=torch.bool)
    for g in units.groups:
        keep[g.offset + int(scores[g.offset : g.offset + g.size].argmax())] = True
    candidates = (~keep).nonzero().flatten()
    ranked = torch.sort(scores[candidates], stable=True).indices
    return candidates[ranked]


def state_without(units: Units, order: torch.Tensor, k: int) -> torch.Tensor:
    """(D,) bool state that keeps every unit but the first ``k`` of ``order``."""
    state = torch.ones(units.num_units, dtype=torch.bool)
    state[order[:k]] = False
    return state


def fit_param_count(
    model: nn.Module,
    units: Units,
    order: torch.Tensor,
    example_inputs: torch.Tensor,
    target: int,
) -> tuple[torch.Tensor, int]:
    """(state, params): remove the first k units of ``order``, k chosen by bisection so that the
    slimmed model's parameter count is the closest to ``target``."""
    memo: dict[int, int] = {}

    def params(k: int) -> int:
        if k not in memo:
            slim = slim_model(model, units, state_without(units, order, k), example_inputs)
            memo[k] = sum(p.numel() for p in slim.parameters())
        return memo[k]

    lo, hi = 0, int(order.numel())
    if params(lo) <= target:
        best = lo
    elif params(hi) > target:
        best = hi  # the budget is below what one unit per group costs: remove all that may go
    else:
        while hi - lo > 1:  # invariant: params(lo) > target >= params(hi)
            mid = (lo + hi) // 2
            if params(mid) <= target:
                hi = mid
            else:
                lo = mid
        best = lo if params(lo) - target < target - params(hi) else hi
    return state_without(units, order, best), params(best)


def random_scores(units: Units, seed: int) -> torch.Tensor:
    """(D,) a seeded random score per unit: the order of the random baseline."""
    return torch.rand(units.num_units, generator=stream(seed, "baseline_ranking"))


def prune_to_params(
    model: nn.Module,
    units: Units,
    example_inputs: torch.Tensor,
    target: int,
    *,
    method: str,
    seed: int,
) -> tuple[torch.Tensor, nn.Module]:
    """(state, slimmed model): ``model`` pruned to about ``target`` parameters by ``method``'s
    ranking, ``magnitude`` (:func:`group_l1_scores`) or ``random`` (:func:`random_scores` with
    ``seed``), fitted with :func:`fit_param_count`."""
    if method == "magnitude":
        scores = group_l1_scores(model, units, example_inputs)
    elif method == "random":
        scores = random_scores(units, seed)
    else:
        raise ValueError(f"method must be magnitude or random, got {method!r}")
    order = prune_order(scores, units)
    state, _ = fit_param_count(model, units, order, example_inputs, target)
    return state, slim_model(model, units, state, example_inputs)


# --------------------------------------------------------------------------- training them


@contextlib.contextmanager
def count_steps() -> Iterator[list[int]]:
    """Count every optimiser step taken in this process while the block runs: ``box[0]``."""
    box = [0]

    def hook(_optimizer, _args, _kwargs) -> None:
        box[0] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def finetune(cfg: Config, data, device, slim: nn.Module, start: int) -> Learner:
    """Train ``slim`` dense from step ``start`` to the end of the budget."""
    train_set, _test_set, info = data
    # same data order and optimiser settings; the slimmed model has no masked channels left
    model = slim.to(device)
    optimizer = build_optimizer(
        model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    learner = Learner(
        cfg, train_set, info, device, model=model, optimizer=optimizer, masked=False,
        start_step=start,
    )  # fmt: skip
    while learner.step < learner.total_steps:
        learner.train(None)
    return learner


def dense_until(cfg: Config, data, device, steps: int) -> tuple[nn.Module, int, float]:
    """(model, counted steps, wall): a dense model trained ``steps`` steps from scratch, the same
    seed and data order as the dense arm (so it is the dense arm's model at that step)."""
    train_set, _test_set, info = data
    t0 = time.perf_counter()
    learner = Learner(cfg, train_set, info, device)
    with count_steps() as counted:
        while learner.step < steps:
            learner.train(None)
    model = copy.deepcopy(learner.model).to("cpu").float()
    return model, counted[0], time.perf_counter() - t0
