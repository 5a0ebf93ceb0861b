"""``edrop-ray compare``: EDropout against dense training, pruning baselines and search controls.

Every arm trains the same model on the same data with the same optimiser (:func:`build_optimizer`)
and the same seeded data order (:meth:`Learner.train_batch`). T is the configured budget
(``epochs`` x steps per epoch); f is the number of steps EDropout trained its final mask (see
"Fine-tuning budget" below).

* **dense**: the unpruned model trained T steps, as the dense baseline of
  :func:`edrop_ray.job.dense_baseline` is (its cache entry is filled from this run, so the EDropout
  jobs below do not train the same model a second time).
* **edropout**: a whole EDropout run, :func:`edrop_ray.job.prune` into ``OUT/edropout`` with the
  config as given (``backend`` included: ``--set backend=local`` runs it in process). T steps.
* **magnitude**: group-L1 magnitude pruning of a dense model to EDropout's parameter count, then
  fine-tuning f steps.
* **random**: the same with a random (seeded) order of the units.
* **random-mask**: the control for the search. A random state with EDropout's parameter count
  (the random order of **random**, fitted on the untrained model: parameter counts do not depend
  on the weights), fixed from step 0 and trained T steps masked, exactly as EDropout trains its
  final mask.
* **edropout-s4**: EDropout with the smallest population binary DE is defined for. S = 1 is not
  EDropout: the mutation needs three members distinct from each other and from the target
  (``population_size >= 4`` in the config), and with one member selection compares a state only
  with its own mutant. S = 4 keeps the whole procedure (same code path, same seed) with the least
  search, so it asks "does a bigger population buy anything?" at equal steps.
* **frozen-first-gen**: EDropout stopped after its first generation (``max_generations=1``): the
  best of generation 1 (same seed, so the same first generation as **edropout**) trained from
  then on, T steps in all. It asks "does evolving past the first selection buy anything?".
* **paper-schedule** (only when ``--arms`` names it): EDropout with the paper's schedule, a
  generation at every training step (``evolve_every: 1``) and S = 16, T steps in all.

Budgets (``--budget``):

* ``equal-steps`` (default): every arm trains T steps in all. Magnitude and random pruning start
  from a dense model trained T - f steps (the same seed and data order as the dense arm, so it is
  the dense arm's model at step T - f), are pruned, then fine-tuned f steps.
* ``equal-finetune``: magnitude and random pruning start from the dense arm's model trained T
  steps and are fine-tuned f steps: T + f steps in all (the behaviour before ``--budget``).

Step counts are counted, not derived: a global optimiser step hook counts the optimiser steps
each arm really takes in this process (``train_steps``; with ``backend=ray`` EDropout trains in
an actor, so its count is the run's own step counter and ``steps_counted`` is false).

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

Fine-tuning budget. EDropout trains its final mask from the training step at which the last
generation ran (when it froze, or, if it never froze, the last generation before the budget ran
out: the best state does not change after it) to the end of the budget: ``f = total_steps -
(history[-1].step - 1)`` (a history row's ``step`` is counted after the generation's training
step). Each baseline is fine-tuned for exactly f steps, on the very batches EDropout trained its
final mask on (steps ``T - f .. T - 1`` of the seeded data order), with a fresh optimiser of the
same settings.

Seeds (``--seeds 0,1,2``). Every arm runs once per seed into ``OUT/seed<N>/`` (a complete
single-seed comparison each); ``OUT/compare.json`` and ``compare.md`` hold every seed's rows,
mean and sample standard deviation per arm, and EDropout's lead over each other arm. The lead is
"beyond the spread" when ``|mean(d)| > max(sd(d), sd(EDropout), sd(arm))``, ``d`` being the
per-seed paired differences EDropout - arm; with one seed there is no spread and no verdict.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from . import job, store  # noqa: E402
from .config import Config, config_to_dict, load_config  # noqa: E402
from .errors import UserError  # noqa: E402
from .loop import Learner, measure_pruned  # noqa: E402
from .seeds import stream  # noqa: E402
from .slim import count_params_macs, slim_model  # noqa: E402
from .train import build_optimizer  # noqa: E402
from .units import Units, build_dependency, find_classifier  # noqa: E402

__all__ = [
    "compare",
    "compare_seeds",
    "run_compare_cli",
    "summarize_seeds",
    "group_l1_scores",
    "prune_order",
    "fit_param_count",
    "finetune_budget",
    "parse_seeds",
    "METHODS",
    "DEFAULT_ARMS",
    "BUDGETS",
]

METHODS = (
    "dense", "edropout", "magnitude", "random", "random-mask", "edropout-s4", "frozen-first-gen",
    "paper-schedule",
)  # fmt: skip
# paper-schedule costs S = 16 energies at every step: it runs when --arms names it
DEFAULT_ARMS = tuple(m for m in METHODS if m != "paper-schedule")
REQUIRED = ("dense", "edropout")  # every other arm is measured against these two
BUDGETS = ("equal-steps", "equal-finetune")
OUTPUTS = ("compare.json", "compare.md", "accuracy_vs_params.png")
EDROPOUT_DIR = "edropout"
# arms that are whole EDropout runs: (run folder, config changes)
_RUN_ARMS = {
    "edropout": (EDROPOUT_DIR, {}),
    "edropout-s4": ("edropout-s4", {"population_size": 4}),
    "frozen-first-gen": ("frozen-first-gen", {"max_generations": 1}),
    "paper-schedule": ("paper-schedule", {"evolve_every": 1, "population_size": 16}),
}
_PRUNABLE = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- CLI


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` -> [0, 1, 2]; None stays None (one run with the config's own seed)."""
    if text is None:
        return None
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds must be distinct non-negative integers like 0,1,2; got {text!r}")
    return seeds


def _parse_arms(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_ARMS
    arms = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [a for a in arms if a not in METHODS]
    if unknown:
        raise UserError(f"unknown arm {unknown[0]!r} in --arms; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in arms or m in REQUIRED)


def run_compare_cli(args) -> int:
    """``edrop-ray compare``: no --config runs the built-in defaults (with --set overrides)."""
    cfg = load_config(args.config, list(args.overrides))
    seeds = parse_seeds(getattr(args, "seeds", None))
    arms = _parse_arms(getattr(args, "arms", None))
    budget = getattr(args, "budget", "equal-steps")
    out = args.out or f"runs/compare-{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if seeds is None:
        compare(cfg, out, budget=budget, arms=arms, overwrite=args.overwrite, quiet=args.quiet)
    else:
        compare_seeds(
            cfg,
            out,
            seeds,
            budget=budget,
            arms=arms,
            overwrite=args.overwrite,
            reuse=getattr(args, "reuse", False),
            quiet=args.quiet,
        )
    if not args.quiet:
        print(f"comparison: {out}")
    return 0


# --------------------------------------------------------------------------- ranking and fitting


def group_l1_scores(model: nn.Module, units: Units, example_inputs: torch.Tensor) -> torch.Tensor:
    """(D,) group-L1 importance of every unit of ``model`` (see the module docstring).

    The coupled groups are traced exactly as :func:`edrop_ray.units.discover_units` traces them,
    and are checked against ``units`` group by group.
    """
    model = model.cpu().float()
    example_inputs = example_inputs.cpu().float()
    names = {m: n for n, m in model.named_modules()}
    classifier = find_classifier(model, example_inputs)
    graph = build_dependency(model, example_inputs)
    groups = list(graph.get_all_groups(ignored_layers=[classifier], root_module_types=_PRUNABLE))
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


def _state_without(units: Units, order: torch.Tensor, k: int) -> torch.Tensor:
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
            slim = slim_model(model, units, _state_without(units, order, k), example_inputs)
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
    return _state_without(units, order, best), params(best)


def finetune_budget(history: list[dict[str, Any]], total_steps: int) -> tuple[int, int]:
    """(start, steps): EDropout trained its final mask on steps ``start .. total_steps - 1``.

    ``start`` is the step of the last generation (a history row's ``step`` is counted after the
    training step that follows its generation); no generation at all means the whole budget.
    """
    start = int(history[-1]["step"]) - 1 if history else 0
    start = min(max(start, 0), total_steps)
    return start, total_steps - start


# --------------------------------------------------------------------------- the comparison


def _check_out(out: Path, overwrite: bool) -> None:
    # a comparison folder (compare.json, OUT/edropout) is replaced only whole, and only when it
    # holds nothing but this tool's files; see store.check_out
    store.check_out(out, overwrite=overwrite, kind="compare")


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


@contextlib.contextmanager
def _count_steps() -> Iterator[list[int]]:
    """Count every optimiser step taken in this process while the block runs: ``box[0]``."""
    box = [0]

    def hook(_optimizer, _args, _kwargs) -> None:
        box[0] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _finetune(cfg: Config, data, device, slim: nn.Module, start: int) -> Learner:
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


def _dense_until(cfg: Config, data, device, steps: int) -> tuple[nn.Module, int, float]:
    """(model, counted steps, wall): a dense model trained ``steps`` steps from scratch, the same
    seed and data order as the dense arm (so it is the dense arm's model at that step)."""
    train_set, _test_set, info = data
    t0 = time.perf_counter()
    learner = Learner(cfg, train_set, info, device)
    with _count_steps() as counted:
        while learner.step < steps:
            learner.train(None)
    model = copy.deepcopy(learner.model).to("cpu").float()
    return model, counted[0], time.perf_counter() - t0


def _baseline(
    method: str,
    cfg: Config,
    data,
    device,
    source: nn.Module,
    units: Units,
    example: torch.Tensor,
    *,
    target: int,
    start: int,
    source_wall: float,
    source_steps: int,
    params_dense: int,
) -> dict[str, Any]:
    """Prune ``source`` (a dense model trained ``source_steps`` counted steps) to ``target``
    parameters by ``method``'s ranking, then fine-tune it from step ``start`` to the end."""
    t0 = time.perf_counter()
    if method == "magnitude":
        scores = group_l1_scores(source, units, example)
    else:
        scores = _random_scores(cfg, units)
    order = prune_order(scores, units)
    state, _ = fit_param_count(source, units, order, example, target)
    slim = slim_model(source, units, state, example)
    params, macs = count_params_macs(slim, example)
    prune_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    with _count_steps() as counted:
        learner = _finetune(cfg, data, device, slim, start)
    result = learner.evaluate(data[1], None)
    finetune_wall = time.perf_counter() - t1
    return {
        "method": method,
        "top1": result["top1"],
        "top5": result["top5"],
        "params": params,
        "macs": macs,
        "prune_rate": 1.0 - params / params_dense,
        "wall_s": source_wall + prune_wall + finetune_wall,
        "prune_wall_s": prune_wall,
        "finetune_wall_s": finetune_wall,
        "kept_units": int(state.sum()),
        "train_steps": source_steps + counted[0],  # dense steps, then the fine-tuning steps
        "finetune_steps": counted[0],
        "steps_counted": True,
        "params_vs_edropout": params / target - 1.0,
    }


def _random_scores(cfg: Config, units: Units) -> torch.Tensor:
    return torch.rand(units.num_units, generator=stream(cfg.seed, "baseline_ranking"))


def _random_mask(cfg: Config, data, device, *, target: int, params_dense: int) -> dict[str, Any]:
    """A random state with ``target`` parameters, fixed from step 0, trained the whole budget."""
    train_set, test_set, info = data
    t0 = time.perf_counter()
    learner = Learner(cfg, train_set, info, device)  # EDropout's initial weights (same seed)
    units, example = learner.units, learner.example
    order = prune_order(_random_scores(cfg, units), units)
    initial = copy.deepcopy(learner.model).to("cpu").float()
    state, _ = fit_param_count(initial, units, order, example, target)
    del initial
    with _count_steps() as counted:
        while learner.step < learner.total_steps:
            learner.train(state)
    _slim, m = measure_pruned(learner, test_set, state)
    return {
        "method": "random-mask",
        "top1": m["top1"],
        "top5": m["top5"],
        "params": m["params_pruned"],
        "macs": m["macs_pruned"],
        "prune_rate": 1.0 - m["params_pruned"] / params_dense,
        "wall_s": time.perf_counter() - t0,
        "kept_units": m["kept_units"],
        "train_steps": counted[0],
        "finetune_steps": counted[0],  # the mask never changes
        "steps_counted": True,
        "params_vs_edropout": m["params_pruned"] / target - 1.0,
    }


def _edropout_run(
    method: str, cfg: Config, out: Path, *, overwrite: bool, quiet: bool
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(report, history, counted steps) of one EDropout run arm into ``out/<its folder>``."""
    folder, changes = _RUN_ARMS[method]
    run_cfg = replace(cfg, **changes)
    with _count_steps() as counted:
        report = job.prune(run_cfg, out / folder, overwrite=overwrite, quiet=quiet)
    history = pq.read_table(out / folder / "history.parquet").to_pylist()
    return report, history, counted[0]


def _run_row(
    method: str,
    report: dict[str, Any],
    history: list[dict[str, Any]],
    counted: int,
    *,
    backend: str,
    params_dense: int,
    target: int,
) -> dict[str, Any]:
    params = int(report["params_pruned"])
    local = backend == "local"
    _start, ft_steps = finetune_budget(history, int(report["steps"]))
    return {
        "method": method,
        "top1": report["pruned_top1"],
        "top5": report["pruned_top5"],
        "params": params,
        "macs": int(report["macs_pruned"]),
        "prune_rate": 1.0 - params / params_dense,
        "wall_s": report["wall_s"],
        "kept_units": report["kept_units"],
        # in process, the optimiser steps counted here; on Ray they happen in the trainer actor
        "train_steps": counted if local else int(report["steps"]),
        "finetune_steps": ft_steps,
        "steps_counted": local,
        "generations": report["generations"],
        "converged_at": report["converged_at"],
        "run": _RUN_ARMS[method][0],
        "params_vs_edropout": params / target - 1.0,
    }


def compare(
    cfg: Config,
    out: str | Path,
    *,
    budget: str = "equal-steps",
    arms: Sequence[str] = DEFAULT_ARMS,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Run the arms of :data:`METHODS` (``arms``) with ``cfg`` into the folder ``out``.

    Writes ``compare.json``, ``compare.md`` and ``accuracy_vs_params.png`` in ``out`` and the
    EDropout run directories (``edropout``, ``edropout-s4``, ``frozen-first-gen``) beside them.
    A folder that already holds a comparison is refused unless ``overwrite``.
    """
    if budget not in BUDGETS:
        raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    arms = tuple(m for m in METHODS if m in arms or m in REQUIRED)
    out = Path(out)
    _check_out(out, overwrite)
    data = job.load_data(cfg)  # data errors surface here, before anything is written
    device = job.check_inputs(cfg, data)  # and the Ray address, the device, batch_size
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    train_set, test_set, info = data
    learner = Learner(cfg, train_set, info, device)  # batch-size errors surface here too
    console = None if quiet else Console(stderr=True)

    # the new comparison is written aside (OUT.new when OUT holds one) and swapped in at the end
    final, out = out, store.stage_out(out, kind="compare")

    # 1. dense, the baseline every pruned model is measured against
    _say(console, f"compare: dense training ({learner.total_steps} steps)")
    # recorded as the dense baseline too: the EDropout jobs below do not train it again
    with _count_steps() as dense_counted:
        dense_eval = job.train_dense(learner, test_set)
    dense_wall = dense_eval["wall_s"]
    example = learner.example
    dense_model = copy.deepcopy(learner.model).to("cpu").float()
    units = learner.units
    params_dense, macs_dense = count_params_macs(dense_model, example)
    total_steps = learner.total_steps
    del learner

    # 2. EDropout
    _say(console, f"compare: EDropout (backend {cfg.backend})")
    report, history, counted = _edropout_run("edropout", cfg, out, overwrite=overwrite, quiet=quiet)
    start, ft_steps = finetune_budget(history, int(report["steps"]))
    target = int(report["params_pruned"])

    rows: list[dict[str, Any]] = [
        {
            "method": "dense",
            "top1": dense_eval["top1"],
            "top5": dense_eval["top5"],
            "params": params_dense,
            "macs": macs_dense,
            "prune_rate": 0.0,
            "wall_s": dense_wall,
            "train_steps": dense_counted[0],
            "finetune_steps": 0,
            "steps_counted": True,
        },
        _run_row(
            "edropout",
            report,
            history,
            counted,
            backend=cfg.backend,
            params_dense=params_dense,
            target=target,
        ),  # fmt: skip
    ]

    # 3 and 4. magnitude and random structured pruning at EDropout's parameter count
    baselines = [m for m in ("magnitude", "random") if m in arms]
    if baselines:
        if budget == "equal-steps":
            _say(console, f"compare: dense training to step {start} for the pruning baselines")
            source, source_steps, source_wall = _dense_until(cfg, data, device, start)
        else:
            source, source_steps, source_wall = dense_model, dense_counted[0], dense_wall
        for method in baselines:
            _say(console, f"compare: {method} pruning to {target} parameters, {ft_steps} steps")
            rows.append(
                _baseline(
                    method,
                    cfg,
                    data,
                    device,
                    source,
                    units,
                    example,
                    target=target,
                    start=start,
                    source_wall=source_wall,
                    source_steps=source_steps,
                    params_dense=params_dense,
                )  # fmt: skip
            )
        del source
    del dense_model

    # 5. the search's controls
    if "random-mask" in arms:
        _say(console, f"compare: random mask of {target} parameters, {total_steps} steps")
        rows.append(_random_mask(cfg, data, device, target=target, params_dense=params_dense))
    for method in ("edropout-s4", "frozen-first-gen", "paper-schedule"):
        if method in arms:
            _say(console, f"compare: {method}")
            arm_report, arm_history, arm_counted = _edropout_run(
                method, cfg, out, overwrite=overwrite, quiet=quiet
            )
            rows.append(
                _run_row(
                    method,
                    arm_report,
                    arm_history,
                    arm_counted,
                    backend=cfg.backend,
                    params_dense=params_dense,
                    target=target,
                )  # fmt: skip
            )

    result = {
        "format": "edrop_ray.compare/2",
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "backend": cfg.backend,
        "budget": budget,
        "params_dense": params_dense,
        "target_params": target,
        "num_units": units.num_units,
        "total_steps": total_steps,
        "finetune_start_step": start,
        "finetune_steps": ft_steps,
        "edropout_converged_at": report["converged_at"],
        "edropout_generations": report["generations"],
        "edropout_run": EDROPOUT_DIR,
        "rows": rows,
        "config": config_to_dict(cfg),
    }
    _write_plot(out / "accuracy_vs_params.png", result)
    store.write_atomic(out / "compare.md", to_markdown(result).encode())
    store.write_json(out / "compare.json", result)  # last: its presence means "complete"
    store.commit_out(out)
    out = final
    if not quiet:
        print_table(result)
    return result


# --------------------------------------------------------------------------- seeds


def compare_seeds(
    cfg: Config,
    out: str | Path,
    seeds: Sequence[int],
    *,
    budget: str = "equal-steps",
    arms: Sequence[str] = DEFAULT_ARMS,
    overwrite: bool = False,
    reuse: bool = False,
    quiet: bool = False,
) -> dict:
    """:func:`compare` once per seed into ``out/seed<N>``, then the summary over seeds in ``out``.

    ``reuse`` keeps a seed's finished comparison (``out/seed<N>/compare.json``) when it was run
    with the same config (but the seed), budget and arms, so that seeds can run in separate
    processes and be summarised afterwards; any other finished seed folder is refused.
    """
    out = Path(out)
    if reuse:
        store.check_reuse_out(out)
    else:
        _check_out(out, overwrite)
    store.mark_out(out, "compare")  # the seeds' folders are written in place, each staged
    arms = tuple(m for m in METHODS if m in arms or m in REQUIRED)
    per_seed = []
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed)
        folder = out / f"seed{seed}"
        done = folder / "compare.json"
        if reuse and done.is_file():
            result = json.loads(done.read_text())
            same = (
                _same_config(result.get("config") or {}, seed_cfg)
                and result.get("budget") == budget
                and [r["method"] for r in result["rows"]] == list(arms)
            )
            if not same:
                raise UserError(
                    f"{str(done)!r} was run with another config, budget or arms; "
                    "pick another --out or pass --overwrite without --reuse"
                )
        else:
            result = compare(
                seed_cfg, folder, budget=budget, arms=arms, overwrite=overwrite, quiet=quiet
            )
        per_seed.append(result)
    summary = summarize_seeds(per_seed)
    _write_seeds_plot(out / "accuracy_vs_params.png", summary)
    store.write_atomic(out / "compare.md", seeds_markdown(summary).encode())
    store.write_json(out / "compare.json", summary)
    if not quiet:
        print(seeds_markdown(summary))
    return summary


def _same_config(stored: dict[str, Any], cfg: Config) -> bool:
    """Whether a stored config is ``cfg``; keys added since it was written count as defaults."""
    defaults = {f.name: f.default for f in fields(Config)}
    return all(stored.get(k, defaults[k]) == v for k, v in config_to_dict(cfg).items())


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_seeds(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every seed's rows, mean and sample std per arm, and EDropout's lead over each arm."""
    first = per_seed[0]
    methods = [r["method"] for r in first["rows"]]
    by = {
        m: [next(r for r in res["rows"] if r["method"] == m) for res in per_seed] for m in methods
    }
    arms = []
    for m in methods:
        rows = by[m]
        top1 = [r["top1"] for r in rows]
        arms.append(
            {
                "method": m,
                "top1_mean": statistics.fmean(top1),
                "top1_sd": _sd(top1),
                "top5_mean": statistics.fmean(r["top5"] for r in rows),
                "params_mean": statistics.fmean(r["params"] for r in rows),
                "prune_rate_mean": statistics.fmean(r["prune_rate"] for r in rows),
                "prune_rate_sd": _sd([r["prune_rate"] for r in rows]),
                "train_steps": [r["train_steps"] for r in rows],
                "top1": top1,
            }
        )
    sd = {a["method"]: a["top1_sd"] for a in arms}
    edrop = [r["top1"] for r in by["edropout"]]
    leads = []
    for m in methods:
        if m == "edropout":
            continue
        diffs = [e - r["top1"] for e, r in zip(edrop, by[m], strict=True)]
        mean, sd_diff = statistics.fmean(diffs), _sd(diffs)
        spread = max(sd_diff, sd["edropout"], sd[m])
        if len(diffs) < 2:
            verdict = "one seed: no spread"
        elif abs(mean) <= spread:
            verdict = "within the spread"
        else:
            verdict = "EDropout ahead" if mean > 0 else "EDropout behind"
        leads.append(
            {
                "method": m,
                "lead_mean": mean,
                "lead_sd": sd_diff,
                "spread": spread,
                "verdict": verdict,
                "diffs": diffs,
            }  # fmt: skip
        )
    return {
        "format": "edrop_ray.compare-seeds/1",
        "dataset": first["dataset"],
        "model": first["model"],
        "backend": first["backend"],
        "budget": first["budget"],
        "seeds": [res["seed"] for res in per_seed],
        "total_steps": first["total_steps"],
        "finetune_steps": [res["finetune_steps"] for res in per_seed],
        "params_dense": first["params_dense"],
        "spread_rule": "|mean(d)| > max(sd(d), sd(EDropout), sd(arm)), d = EDropout - arm per seed",
        "arms": arms,
        "leads": leads,
        "per_seed": [
            {k: res[k] for k in ("seed", "target_params", "finetune_steps", "rows")}
            for res in per_seed
        ],
        "config": {k: v for k, v in first["config"].items() if k != "seed"},
    }


# --------------------------------------------------------------------------- output


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """(method, Top-1, Top-5, params, MACs, pruning rate, steps, wall time) as display strings."""
    return [
        (
            r["method"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['params'] / 1e6:.3f} M",
            f"{r['macs'] / 1e6:.2f} M",
            f"{100 * r['prune_rate']:.1f}%",
            str(r["train_steps"]),
            f"{r['wall_s']:.1f}",
        )
        for r in result["rows"]
    ]


HEADERS = (
    "method", "Top-1 (%)", "Top-5 (%)", "params", "MACs", "pruning rate", "steps trained",
    "wall time (s)",
)  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"compare: {result['model']} on {result['dataset']} ({result['budget']})")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(result):
        table.add_row(*row)
    Console().print(table)


def _budget_note(budget: str, total: int, finetune: Any, start: Any) -> str:
    if budget == "equal-steps":
        return (
            f"Budget: equal-steps. Every arm trains {total} steps in all. Magnitude (group L1) and "
            f"random pruning train dense to step {start}, are slimmed to EDropout's parameter "
            f"count and fine-tuned {finetune} steps (the steps EDropout trained its final mask). "
            "random-mask trains a random state of EDropout's parameter count from step 0; "
            "edropout-s4 is EDropout with S = 4; frozen-first-gen keeps the best state of "
            "generation 1; paper-schedule evolves at every step with S = 16. Steps are counted "
            "optimiser steps."
        )
    return (
        f"Budget: equal-finetune. Dense, EDropout and the controls train {total} steps. Magnitude "
        f"(group L1) and random pruning start from the dense model trained {total} steps, are "
        f"slimmed to EDropout's parameter count and fine-tuned {finetune} steps (the steps "
        f"EDropout trained its final mask, from step {start}): {total} + {finetune} steps in all. "
        "Steps are counted optimiser steps."
    )


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# compare: {result['model']} on {result['dataset']} (seed {result['seed']})",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    note = _budget_note(
        result["budget"], result["total_steps"], result["finetune_steps"],
        result["finetune_start_step"],
    )  # fmt: skip
    lines += ["", note, ""]
    return "\n".join(lines)


def seeds_markdown(summary: dict[str, Any]) -> str:
    """The summary over seeds: mean ± std per arm, each seed's Top-1, and EDropout's leads."""
    seeds = summary["seeds"]
    head = ["method", "Top-1 (%) mean ± std", "pruning rate", "params", "steps trained"]
    head += [f"seed {s}" for s in seeds]
    lines = [
        f"# compare: {summary['model']} on {summary['dataset']}, seeds "
        f"{', '.join(map(str, seeds))} ({summary['budget']})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for a in summary["arms"]:
        steps = sorted(set(a["train_steps"]))
        cells = [
            a["method"],
            f"{a['top1_mean']:.2f} ± {a['top1_sd']:.2f}",
            f"{100 * a['prune_rate_mean']:.1f}%",
            f"{a['params_mean'] / 1e6:.3f} M",
            "/".join(map(str, steps)),
        ] + [f"{t:.2f}" for t in a["top1"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"EDropout's lead (Top-1 points; beyond the spread when {summary['spread_rule']}):",
        "",
        "| vs | lead mean | sd of paired diffs | spread | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for lead in summary["leads"]:
        lines.append(
            f"| {lead['method']} | {lead['lead_mean']:+.2f} | {lead['lead_sd']:.2f} | "
            f"{lead['spread']:.2f} | {lead['verdict']} |"
        )
    finetune = "/".join(map(str, summary["finetune_steps"]))
    note = _budget_note(summary["budget"], summary["total_steps"], f"{finetune} (per seed)",
                        "T - f")  # fmt: skip
    lines += ["", note, ""]
    return "\n".join(lines)


_MARKERS = "o^sDvP*X"  # the baselines sit on EDropout's parameter count: shapes tell them apart


def _write_plot(path: Path, result: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(result["rows"]):
        ax.scatter(r["params"] / 1e6, r["top1"], s=50, marker=_MARKERS[i % len(_MARKERS)],
                   label=r["method"], alpha=0.8)  # fmt: skip
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Top-1 (%)")
    ax.set_title(f"{result['model']} on {result['dataset']} ({result['budget']})")
    _finish_plot(fig, ax, path)


def _write_seeds_plot(path: Path, summary: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, a in enumerate(summary["arms"]):
        ax.errorbar(a["params_mean"] / 1e6, a["top1_mean"], yerr=a["top1_sd"], capsize=4,
                    marker=_MARKERS[i % len(_MARKERS)], linestyle="none", label=a["method"],
                    alpha=0.8)  # fmt: skip
    seeds = ", ".join(map(str, summary["seeds"]))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Top-1 (%), mean ± std")
    ax.set_title(f"{summary['model']} on {summary['dataset']}, seeds {seeds} ({summary['budget']})")
    _finish_plot(fig, ax, path)


def _finish_plot(fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_atomic(path, buf.getvalue())
