"""``edrop-ray compare``: EDropout against dense training, pruning baselines and search controls.

Runs the arms of :mod:`edrop_ray.arms` (what each arm is, the budgets, how steps are counted) into
one folder: ``compare.json``, ``compare.md``, ``accuracy_vs_params.png`` and the EDropout run
folders. The baselines rank, remove and fit units with :mod:`edrop_ray.baselines`; the tables and
plots are :mod:`edrop_ray.report.compare`'s; ``--seeds`` summaries are :mod:`edrop_ray.seed_stats`'s
and the command line is :mod:`edrop_ray.compare_cli`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from rich.console import Console
from torch import nn

from . import job, store
from .arms import BUDGETS, DEFAULT_ARMS, EDROPOUT_DIR, METHODS, REQUIRED, finetune_budget
from .arms import RUN_ARMS as _RUN_ARMS
from .baselines import (
    count_steps,
    dense_until,
    finetune,
    fit_param_count,
    prune_order,
    prune_to_params,
    random_scores,
)
from .config import Config, config_to_dict
from .errors import UserError
from .learner import Learner
from .loop import measure_pruned
from .report.compare import print_table, seeds_markdown, to_markdown
from .report.compare import write_compare_plot as _write_plot
from .report.compare import write_seeds_plot as _write_seeds_plot
from .seed_stats import same_config as _same_config
from .seed_stats import summarize_seeds
from .slim import count_params_macs
from .units import Units

__all__ = [
    "compare",
    "compare_seeds",
    "finetune_budget",
    "METHODS",
    "DEFAULT_ARMS",
    "BUDGETS",
]

# --------------------------------------------------------------------------- the comparison


def _check_out(out: Path, overwrite: bool) -> None:
    # a comparison folder (compare.json, OUT/edropout) is replaced only whole, and only when it
    # holds nothing but this tool's files; see store.check_out
    store.check_out(out, overwrite=overwrite, kind="compare")


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


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
    state, slim = prune_to_params(source, units, example, target, method=method, seed=cfg.seed)
    params, macs = count_params_macs(slim, example)
    prune_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    with count_steps() as counted:
        learner = finetune(cfg, data, device, slim, start)
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


def _random_mask(cfg: Config, data, device, *, target: int, params_dense: int) -> dict[str, Any]:
    """A random state with ``target`` parameters, fixed from step 0, trained the whole budget."""
    train_set, test_set, info = data
    t0 = time.perf_counter()
    learner = Learner(cfg, train_set, info, device)  # EDropout's initial weights (same seed)
    units, example = learner.units, learner.example
    order = prune_order(random_scores(units, cfg.seed), units)
    initial = copy.deepcopy(learner.model).to("cpu").float()
    state, _ = fit_param_count(initial, units, order, example, target)
    del initial
    with count_steps() as counted:
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
    with count_steps() as counted:
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
    with count_steps() as dense_counted:
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
            source, source_steps, source_wall = dense_until(cfg, data, device, start)
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
