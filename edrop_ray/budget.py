"""Exact parameter and MAC counts of many pruning states at once, and budget repair.

The slimmed model of a state (:func:`edrop_ray.slim.slim_model`) keeps, in every coupled group g,
``k_g`` channels: the units of g that are on, or one silenced channel when all are off. Every tensor
of the network then has ``a + sum_g n_g * k_g`` channels (a fixed channels, n_g channels per unit of
g: 1 for a conv input, H*W after a flatten), and each term Torch-Pruning's op counter adds (a conv's
``K * C_in * C_out / groups * H * W``, a BatchNorm's ``2 * C * H * W``, a ReLU's ``C * H * W``, ...)
is a polynomial of degree <= 2 in those counts. :func:`build_counter` finds the channel -> group
maps once per model (one forward pass of log2(G) replicas of one sample, each marking a set of
groups with NaN where a state would zero them; the marks follow a channel until the next
conv/linear), writes every term as a quadratic form in ``[1, k_1 .. k_G]``, and checks itself
against one slimmed model. Counting S states is then two (S, G+1) x (G+1, G+1) products: no
slimming and no forward pass per state.

Grouped convolutions with ``1 < groups < in_channels`` are counted with their groups fixed, but
:func:`~edrop_ray.slim.slim_model` cannot slim them yet (Torch-Pruning's DependencyGraph does not
couple their channel groups), so a state that prunes channels through them has no slimmed model to
compare with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .population import uniform_rows
from .units import Units

__all__ = ["Counter", "build_counter", "counter_for", "budget_report", "repair_budget"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)
_POOL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_NORM = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@dataclass(frozen=True)
class Counter:
    """Exact (params, MACs) of pruning states as quadratic forms in the kept counts per group.

    group_of:  (D,) long, the group of each unit.
    params_q:  (G+1, G+1) float64, params(s) = k~ Q k~^T with k~ = [1, max(k_1, 1), ...].
    macs_q:    (G+1, G+1) float64, the same for MACs of one sample.
    dense_params, dense_macs: the counts of the unpruned model.
    grouped:   groups whose channels enter or leave a grouped conv (1 < groups < in_channels):
               counted with fixed conv groups, but slim_model cannot prune them yet.
    Plain tensors: pickles cheaply to Ray actors.
    """

    group_of: torch.Tensor
    params_q: torch.Tensor
    macs_q: torch.Tensor
    dense_params: int
    dense_macs: int
    grouped: tuple[int, ...] = ()

    @property
    def num_units(self) -> int:
        return int(self.group_of.numel())

    def kept_counts(self, states: torch.Tensor) -> torch.Tensor:
        """(S, G+1) float64 ``[1, k_1 .. k_G]`` of (S, D) states; an all-off group counts 1."""
        states = states.reshape(-1, self.num_units).to(torch.float64)
        k = torch.zeros(states.shape[0], self.params_q.shape[0] - 1, dtype=torch.float64)
        k.index_add_(1, self.group_of, states)
        return torch.cat([torch.ones(len(k), 1, dtype=torch.float64), k.clamp_min(1.0)], dim=1)

    def count(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(params, MACs), each (S,) int64, of the slimmed models of (S, D) bool ``states``."""
        k = self.kept_counts(states.cpu())
        params = ((k @ self.params_q) * k).sum(1).round().to(torch.int64)
        macs = ((k @ self.macs_q) * k).sum(1).round().to(torch.int64)
        return params, macs

    def fractions(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(params, MACs) as (S,) float fractions of the dense model."""
        params, macs = self.count(states)
        return params.double() / self.dense_params, macs.double() / self.dense_macs


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    return x.dim() - 1 if isinstance(module, nn.Linear) or x.dim() == 2 else 1


def _marked_channels(x: torch.Tensor, replicas: int, dim: int) -> torch.Tensor:
    """(replicas, C) bool: channels that are NaN (marked) in every sample of each replica."""
    x = x.detach().movedim(dim, 1)
    x = x.reshape(replicas, -1, x.shape[1], *x.shape[2:]).transpose(1, 2)
    return x.isnan().reshape(replicas, x.shape[1], -1).all(dim=2)


def _per_group(flags: torch.Tensor, group_sizes: torch.Tensor, where: str) -> torch.Tensor:
    """(G+1,) float64 ``[fixed channels, channels per unit of each group]`` from marks:
    flags (R, C), replica r marks the groups g whose code g+1 has bit r set."""
    weights = 2 ** torch.arange(flags.shape[0])
    code = (flags.long() * weights[:, None]).sum(0)  # (C,) 0 = fixed, g+1 = group g
    if bool((code > len(group_sizes)).any()):
        raise ValueError(f"a channel of {where} depends on two coupled groups; cannot count it")
    per = torch.bincount(code, minlength=len(group_sizes) + 1).to(torch.float64)
    if bool((per[1:] % group_sizes).any()):
        raise ValueError(f"the channels of {where} do not split evenly over their units")
    return torch.cat([per[:1], per[1:] / group_sizes])


def _per_group_units(unit_of: torch.Tensor, groups_of: torch.Tensor, sizes: torch.Tensor):
    counts = torch.zeros(len(sizes), dtype=torch.float64)
    counts.index_add_(0, groups_of[unit_of], torch.ones(len(unit_of), dtype=torch.float64))
    return torch.cat([torch.zeros(1, dtype=torch.float64), counts / sizes])


def _fixed(n: int, size: int) -> torch.Tensor:
    v = torch.zeros(size, dtype=torch.float64)
    v[0] = n
    return v


def build_counter(
    model: nn.Module, units: Units, example_inputs: torch.Tensor, *, verify: bool = True
) -> Counter:
    """The exact count of ``model``'s slimmed states (see the module docstring).

    ``verify`` slims the model once at a random state and checks the count against
    Torch-Pruning's; a model whose count cannot be made exact raises ValueError.
    """
    from .slim import count_params_macs  # local: slim imports the model grid

    sizes = torch.tensor([g.size for g in units.groups], dtype=torch.float64)
    num_groups = len(units.groups)
    group_of = torch.cat(
        [torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(units.groups)]
    )
    n = num_groups + 1
    x = example_inputs.detach().cpu().float()[:1]
    bits = max(1, int(num_groups).bit_length())  # replicas of the probing pass
    model_was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    # Replica r sets to NaN, where a state would zero them, the channels of every group g whose
    # code g+1 has bit r set: log2(G) replicas name the group of every channel. NaN flows
    # channel-wise through activations, norms, pooling, additions, concatenations and
    # flattening, so it marks exactly the channels a group owns in every tensor, even dead
    # (all-zero) ones; each conv/linear records its input marks and clears them.
    codes = {name: group_of[unit_of] + 1 for name, unit_of in units.mask_points.items()}
    marks = {
        name: (code[None, :] >> torch.arange(bits)[:, None]) & 1 == 1
        for name, code in codes.items()
    }
    calls: list[tuple[nn.Module, torch.Tensor, int, tuple[int, ...]]] = []

    def mark(name):
        def hook(_module, _inputs, out):
            m = marks[name].to(out.device)
            shaped = out.view(bits, -1, *out.shape[1:]).clone()
            m = m.view(bits, 1, m.shape[1], *([1] * (out.dim() - 2))).expand_as(shaped)
            return shaped.masked_fill(m, float("nan")).view(out.shape)

        return hook

    def record(module, inputs):
        inp = inputs[0]
        dim = _channel_dim(module, inp)
        spatial = inp[:1].numel() // inp.shape[dim]  # per-sample elements per channel
        calls.append((module, _marked_channels(inp, bits, dim).cpu(), spatial, ()))
        if isinstance(module, _CONV + (nn.Linear,)):
            return (inp.nan_to_num(0.0), *inputs[1:])
        return None

    def shape_out(module, _inputs, output):
        if isinstance(module, _CONV):
            for i in range(len(calls) - 1, -1, -1):
                if calls[i][0] is module:
                    calls[i] = (*calls[i][:3], tuple(output.shape[2:]))
                    break

    names = {m: name for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    counted = _CONV + _ACT + _POOL + _NORM + (nn.Linear,)
    handles = [modules[name].register_forward_hook(mark(name)) for name in units.mask_points]
    for m in model.modules():
        if isinstance(m, counted):
            handles.append(m.register_forward_pre_hook(record))
            handles.append(m.register_forward_hook(shape_out))
    try:
        with torch.no_grad():
            model(x.to(device).repeat(bits, *([1] * (x.dim() - 1))))
    finally:
        for h in handles:
            h.remove()
        model.train(model_was_training)

    def out_map(module: nn.Module, size: int) -> torch.Tensor:
        unit_of = units.channel_units.get(names[module])
        if unit_of is None:
            return _fixed(size, n)
        return _per_group_units(unit_of, group_of, sizes)

    params_q = torch.zeros(n, n, dtype=torch.float64)
    macs_q = torch.zeros(n, n, dtype=torch.float64)
    seen: set[nn.Module] = set()
    grouped: set[int] = set()
    for module, flags, spatial_in, out_spatial in calls:
        where = names[module]
        first = module not in seen
        seen.add(module)
        if isinstance(module, _NORM) and where in units.channel_units:
            c_in = out_map(module, flags.shape[1])  # its input is the unmasked conv output
        else:
            c_in = _per_group(flags, sizes, where)
        if isinstance(module, _CONV):
            c_out = out_map(module, module.out_channels)
            k = float(torch.tensor(module.kernel_size).prod())
            positions = float(torch.tensor(out_spatial, dtype=torch.float64).prod())
            bias = module.bias is not None
            if module.groups > 1 and module.groups == module.in_channels:
                # depthwise: Torch-Pruning sets groups = in_channels, one input channel per filter
                weight_q = torch.outer(_unit(n), c_out)
            else:
                weight_q = torch.outer(c_in, c_out) / module.groups
                if module.groups > 1:
                    touched = ((c_in[1:] > 0) | (c_out[1:] > 0)).nonzero().flatten()
                    grouped.update(touched.tolist())
            macs_q += k * positions * weight_q
            if bias:
                macs_q[0] += positions * c_out
            if first:
                params_q += k * weight_q
                if bias:
                    params_q[0] += c_out
        elif isinstance(module, nn.Linear):
            c_out = out_map(module, module.out_features)
            macs_q += spatial_in * torch.outer(c_in, c_out)
            if module.bias is not None:
                macs_q[0] += c_out
            if first:
                params_q += torch.outer(c_in, c_out)
                if module.bias is not None:
                    params_q[0] += c_out
        elif isinstance(module, _NORM):
            affine = bool(getattr(module, "affine", False))
            macs_q[0] += (2 if affine else 1) * spatial_in * c_in
            if first and affine:
                params_q[0] += 2 * c_in
        elif isinstance(module, _ACT):
            macs_q[0] += spatial_in * c_in  # numel(output) = numel(input)
        else:  # pooling counts its input
            macs_q[0] += spatial_in * c_in

    dense_params, dense_macs = count_params_macs(model, x.to(device))
    # whatever no counted module depends on (parameters of other modules, ops on fixed channels)
    ones = torch.ones(1, n, dtype=torch.float64)
    ones[0, 1:] = sizes
    params_q[0, 0] += dense_params - float((ones @ params_q @ ones.T).round())
    macs_q[0, 0] += dense_macs - float((ones @ macs_q @ ones.T).round())
    counter = Counter(
        group_of, params_q, macs_q, int(dense_params), int(dense_macs), tuple(sorted(grouped))
    )
    if verify:
        _verify(counter, model, units, x)
    return counter


def _unit(n: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.float64)
    v[0] = 1
    return v


def _verify(counter: Counter, model: nn.Module, units: Units, x: torch.Tensor) -> None:
    from .slim import count_params_macs, slim_model

    g = torch.Generator().manual_seed(0)
    state = torch.rand(units.num_units, generator=g) < 0.5
    state[torch.isin(counter.group_of, torch.tensor(counter.grouped, dtype=torch.long))] = True
    want = count_params_macs(slim_model(model, units, state, x), x)
    got = tuple(int(v[0]) for v in counter.count(state[None]))
    if got != want:
        raise ValueError(
            f"the unit-structure count {got} differs from Torch-Pruning's {want} on a slimmed "
            "model: this model has a layer the budget counter does not model"
        )


def repair_budget(
    states: torch.Tensor,
    counter: Counter,
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator],
) -> torch.Tensor:
    """Switch kept units off, in a random order per state, until every state fits the budget.

    generator: one, or one per state (:func:`edrop_ray.population.uniform_rows`); only the
    states over the budget draw, so what a state draws never depends on the others.

    states: (S, D) bool; returns a new tensor. Each state loses the fewest units of its random
    order that bring it within ``max_params`` and ``max_macs`` (a binary search over that order:
    the counts never grow when a unit is switched off). At least one unit stays on.
    """
    states = states.clone()
    if max_params is None and max_macs is None:
        return states

    def fits(s: torch.Tensor) -> torch.Tensor:
        params, macs = counter.count(s)
        ok = torch.ones(len(s), dtype=torch.bool)
        if max_params is not None:
            ok &= params <= max_params
        if max_macs is not None:
            ok &= macs <= max_macs
        return ok

    bad = (~fits(states)).nonzero().flatten()
    if bad.numel() == 0:
        return states
    sub = states[bad]
    # random priority over kept units; off units sort last and are never "switched off" again
    if not isinstance(generator, torch.Generator):
        generator = [generator[i] for i in bad.tolist()]
    prio = uniform_rows(sub.shape, generator)
    prio[~sub] = 2.0
    order = prio.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(sub.shape[1]).expand_as(order))
    # switching off the first m units of the order: m = lo does not fit, m = hi is the answer
    lo = torch.zeros(len(sub), dtype=torch.long)
    hi = (sub.sum(1) - 1).clamp_min(0)
    while bool((lo + 1 < hi).any()):
        active = lo + 1 < hi
        mid = (lo + hi) // 2
        ok = fits(sub & (rank >= mid[:, None]))
        hi = torch.where(active & ok, mid, hi)
        lo = torch.where(active & ~ok, mid, lo)
    states[bad] = sub & (rank >= hi[:, None])
    return states


def counter_for(cfg, model: nn.Module, units: Units, example_inputs: torch.Tensor):
    """The counter a run with ``cfg`` needs (a :class:`Counter`), or None when it states no
    budget in parameters or MACs and no MACs penalty."""
    if cfg.target_params is None and cfg.target_macs is None and not cfg.macs_lambda:
        return None
    try:
        return build_counter(model, units, example_inputs)
    except ValueError as e:  # a layer the counter does not model: no exact budget possible
        raise UserError(
            f"{cfg.model!r} cannot take target_params, target_macs or macs_lambda: {e}; "
            "prune it without them, or bound the kept units with target_prune_rate"
        ) from None


def budget_report(cfg, measured: dict) -> dict:
    """The budgets asked for next to those reached on the slimmed model (report.json)."""
    return {
        "target_params": cfg.target_params,
        "params_kept": measured["params_pruned"] / measured["params_dense"],
        "target_macs": cfg.target_macs,
        "macs_kept": measured["macs_pruned"] / measured["macs_dense"],
    }
