"""``edrop-ray compare``: EDropout against dense training, magnitude and random pruning.

Four models are trained on the same data with the same optimiser (:func:`build_optimizer`) and
the same seeded data order (:meth:`Learner.train_batch`):

* **dense**: the unpruned model trained for the configured budget (``epochs``), as the dense
  baseline of :func:`edrop_ray.job.dense_baseline` is (its cache entry is filled from this run,
  so the EDropout job below does not train the same model a second time).
* **edropout**: a whole EDropout run, :func:`edrop_ray.job.prune` into ``OUT/edropout`` with the
  config as given (``backend`` included: ``--set backend=local`` runs it in process).
* **magnitude**: group-L1 magnitude pruning of the trained dense model to EDropout's parameter
  count, then fine-tuning.
* **random**: the same with a random (seeded) order of the units.

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
out: the best state does not change after it) to the end of the budget: ``finetune_steps =
total_steps - (history[-1].step - 1)`` (a history row's ``step`` is counted after the generation's
training step). Each baseline is fine-tuned for exactly that many steps, on the very batches
EDropout trained its final mask on (steps ``total_steps - finetune_steps .. total_steps - 1`` of
the seeded data order), with a fresh optimiser of the same settings. The baselines therefore see
the dense budget plus ``finetune_steps``; their wall time counts the dense training too.
"""

from __future__ import annotations

import copy
import io
import time
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

from . import job, store  # noqa: E402
from .config import Config, config_to_dict, load_config  # noqa: E402
from .loop import Learner  # noqa: E402
from .slim import count_params_macs, slim_model  # noqa: E402
from .train import build_optimizer  # noqa: E402
from .units import Units, build_dependency, find_classifier  # noqa: E402

__all__ = [
    "compare",
    "run_compare_cli",
    "group_l1_scores",
    "prune_order",
    "fit_param_count",
    "finetune_budget",
    "METHODS",
]

METHODS = ("dense", "edropout", "magnitude", "random")
OUTPUTS = ("compare.json", "compare.md", "accuracy_vs_params.png")
EDROPOUT_DIR = "edropout"
_PRUNABLE = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- CLI


def run_compare_cli(args) -> int:
    """``edrop-ray compare``: no --config runs the built-in defaults (with --set overrides)."""
    cfg = load_config(args.config, list(args.overrides))
    out = args.out or f"runs/compare-{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
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


def _finetune(cfg: Config, data, device, slim: nn.Module, start: int) -> tuple[Learner, int]:
    """Train ``slim`` dense from step ``start`` to the end of the budget; (learner, steps)."""
    train_set, _test_set, info = data
    learner = Learner(cfg, train_set, info, device)  # same data order and optimiser settings
    learner.model = slim.to(device=device, memory_format=learner.memory_format)
    learner.optimizer = build_optimizer(
        learner.model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    learner.masker = None  # the slimmed model has no masked channels left
    learner.step = start
    while learner.step < learner.total_steps:
        learner.train(None)
    return learner, learner.step - start


def _baseline(
    method: str,
    cfg: Config,
    data,
    device,
    dense_model: nn.Module,
    units: Units,
    example: torch.Tensor,
    *,
    target: int,
    start: int,
    dense_wall: float,
    dense_steps: int,
    params_dense: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if method == "magnitude":
        scores = group_l1_scores(dense_model, units, example)
    else:
        scores = torch.rand(units.num_units, generator=torch.Generator().manual_seed(cfg.seed))
    order = prune_order(scores, units)
    state, _ = fit_param_count(dense_model, units, order, example, target)
    slim = slim_model(dense_model, units, state, example)
    params, macs = count_params_macs(slim, example)
    prune_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    learner, steps = _finetune(cfg, data, device, slim, start)
    result = learner.evaluate(data[1], None)
    finetune_wall = time.perf_counter() - t1
    return {
        "method": method,
        "top1": result["top1"],
        "top5": result["top5"],
        "params": params,
        "macs": macs,
        "prune_rate": 1.0 - params / params_dense,
        "wall_s": dense_wall + prune_wall + finetune_wall,
        "prune_wall_s": prune_wall,
        "finetune_wall_s": finetune_wall,
        "kept_units": int(state.sum()),
        "train_steps": dense_steps + steps,  # the dense budget, then the fine-tuning steps
        "finetune_steps": steps,
        "params_vs_edropout": params / target - 1.0,
    }


def compare(cfg: Config, out: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run the four methods with ``cfg`` into the folder ``out``; return the comparison.

    Writes ``compare.json``, ``compare.md`` and ``accuracy_vs_params.png`` in ``out`` and the
    EDropout run directory in ``out/edropout``. A folder that already holds a comparison is
    refused unless ``overwrite``.
    """
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

    # 1. dense, the baseline every pruned model starts from
    _say(console, f"compare: dense training ({learner.total_steps} steps)")
    # recorded as the dense baseline too: the EDropout job below does not train it again
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
    run_dir = out / EDROPOUT_DIR
    report = job.prune(cfg, run_dir, quiet=quiet)
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
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
            "train_steps": total_steps,
            "finetune_steps": 0,
        },
        {
            "method": "edropout",
            "top1": report["pruned_top1"],
            "top5": report["pruned_top5"],
            "params": target,
            "macs": int(report["macs_pruned"]),
            "prune_rate": 1.0 - target / params_dense,
            "wall_s": report["wall_s"],
            "kept_units": report["kept_units"],
            "train_steps": int(report["steps"]),
            "finetune_steps": ft_steps,
            "params_vs_edropout": 0.0,
        },
    ]

    # 3 and 4. magnitude and random structured pruning at EDropout's parameter count
    for method in ("magnitude", "random"):
        _say(
            console,
            f"compare: {method} pruning to {target} parameters, {ft_steps} fine-tuning steps",
        )
        rows.append(
            _baseline(
                method,
                cfg,
                data,
                device,
                dense_model,
                units,
                example,
                target=target,
                start=start,
                dense_wall=dense_wall,
                dense_steps=total_steps,
                params_dense=params_dense,
            )
        )

    result = {
        "format": "edrop_ray.compare/1",
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "backend": cfg.backend,
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


# --------------------------------------------------------------------------- output


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """(method, Top-1, Top-5, params, MACs, pruning rate, wall time) as display strings."""
    return [
        (
            r["method"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['params'] / 1e6:.3f} M",
            f"{r['macs'] / 1e6:.2f} M",
            f"{100 * r['prune_rate']:.1f}%",
            f"{r['wall_s']:.1f}",
        )
        for r in result["rows"]
    ]


HEADERS = ("method", "Top-1 (%)", "Top-5 (%)", "params", "MACs", "pruning rate", "wall time (s)")


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"compare: {result['model']} on {result['dataset']}")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(result):
        table.add_row(*row)
    Console().print(table)


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# compare: {result['model']} on {result['dataset']} (seed {result['seed']})",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += [
        "",
        f"Every model trains {result['total_steps']} steps from scratch. Magnitude (group L1) and "
        f"random pruning start from the trained dense model, are slimmed to EDropout's "
        f"{result['target_params']} parameters and fine-tuned {result['finetune_steps']} steps "
        f"(the steps EDropout trained its final mask: from step {result['finetune_start_step']}); "
        "their wall time includes the dense training.",
        "",
    ]
    return "\n".join(lines)


def _write_plot(path: Path, result: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "o^sD"  # the baselines sit on EDropout's parameter count: shapes tell them apart
    for i, r in enumerate(result["rows"]):
        ax.scatter(r["params"] / 1e6, r["top1"], s=50, marker=markers[i % 4], label=r["method"],
                   alpha=0.8)  # fmt: skip
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("Top-1 (%)")
    ax.set_title(f"{result['model']} on {result['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_atomic(path, buf.getvalue())
