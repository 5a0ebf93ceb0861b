"""The paper's grid: every dataset config x every model, one EDropout run each, one results table.

    python scripts/paper_grid.py --out runs/paper-grid                 # the whole grid (35 runs)
    python scripts/paper_grid.py --datasets cifar10 --models resnet18 --set backend=local
    python scripts/paper_grid.py --tiny --out /tmp/grid                # one tiny CPU row (tests)

Each row is an ordinary run directory, OUT/runs/<dataset>-<model>, written by ``job.prune``; the
table (dataset x model: baseline Top-1/Top-5, pruned Top-1/Top-5, pruning rate), in the shape of
the paper's tables, is rewritten after every row as OUT/paper_grid.md and OUT/paper_grid.json.

Re-running with the same --out continues the grid: a row whose run finished with the same config
is read back, not re-run; an interrupted one is resumed from its checkpoint; a row whose config
changed (other --set values) is run again from scratch. A dataset whose files are missing under
its data_root is recorded as "missing data: <message>" for each of its rows, and the grid goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = {  # dataset name -> its grid config (the model is set per row)
    "kmnist": REPO / "configs" / "kmnist.yaml",
    "fashion-mnist": REPO / "configs" / "fashion_mnist.yaml",
    "cifar10": REPO / "configs" / "cifar10.yaml",
    "cifar100": REPO / "configs" / "cifar100.yaml",
    "flowers102": REPO / "configs" / "flowers102.yaml",
}
PAPER_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "squeezenet1_0", "squeezenet1_1",
)  # fmt: skip
TINY = ("digits", REPO / "configs" / "tiny.yaml", "resnet18")
COLUMNS = (
    ("dataset", "dataset"),
    ("model", "model"),
    ("baseline Top-1 (%)", "dense_top1"),
    ("baseline Top-5 (%)", "dense_top5"),
    ("pruned Top-1 (%)", "pruned_top1"),
    ("pruned Top-5 (%)", "pruned_top5"),
    ("pruning rate (%)", "prune_rate"),
    ("params (M)", "params_pruned"),
    ("status", "status"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paper_grid.py", description="EDropout over the paper's dataset x model grid."
    )
    p.add_argument("--out", default="runs/paper-grid", help="grid folder (default runs/paper-grid)")
    p.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        help=f"datasets to run (default all: {', '.join(PAPER_CONFIGS)}); fashion_mnist works too",
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help=f"models (default all: {', '.join(PAPER_MODELS)})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every row, e.g. --set backend=local (repeatable)",
    )
    p.add_argument("--tiny", action="store_true", help="one tiny CPU row (configs/tiny.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress line per run")
    return p


def plan_rows(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(dataset, config path, model) of each row, in table order; UserError on unknown names."""
    from edrop_ray.errors import UserError
    from edrop_ray.models import MODELS

    if args.tiny:
        return [TINY]
    datasets = list(PAPER_CONFIGS)
    if args.datasets:
        datasets = [d.replace("_", "-") for d in args.datasets]
        unknown = [d for d in datasets if d not in PAPER_CONFIGS]
        if unknown:
            raise UserError(
                f"unknown grid dataset {unknown[0]!r}; choose from: {', '.join(PAPER_CONFIGS)}"
            )
    models = list(args.models or PAPER_MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from: {', '.join(MODELS)}")
    return [(d, PAPER_CONFIGS[d], m) for d in datasets for m in models]


def run_row(cfg, run_dir: Path, *, quiet: bool) -> tuple[dict[str, Any], str]:
    """The report of one row's run, and how it was obtained (ran, resumed, reused)."""
    import json

    from edrop_ray import job, store
    from edrop_ray.config import config_to_dict, load_config

    if (run_dir / "config.yaml").is_file():
        same = config_to_dict(load_config(run_dir / "config.yaml")) == config_to_dict(cfg)
        if same and (run_dir / "report.json").is_file():
            return json.loads((run_dir / "report.json").read_text()), "reused"
        if same and (run_dir / store.CHECKPOINT).is_file():
            return job.resume(run_dir, quiet=quiet), "resumed"
    # a new row, or one whose config changed: the grid's own folder is redone from scratch
    return job.prune(cfg, run_dir, overwrite=True, quiet=quiet), "ran"


def table_row(dataset: str, model: str, report: dict[str, Any] | None, status: str) -> dict:
    """One row of the results table; metrics are None when the row has no result."""
    row: dict[str, Any] = {"dataset": dataset, "model": model, "status": status}
    for _, key in COLUMNS[2:-1]:
        row[key] = None if report is None else report.get(key)
    if report is not None:
        row["params_dense"] = report.get("params_dense")
    return row


def grid_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in the paper's shape (markdown)."""

    def cell(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key == "prune_rate":
            return f"{100 * v:.1f}"
        if key == "params_pruned":
            return f"{v / 1e6:.2f}"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    last = len(COLUMNS) - 1
    align = ["---" if i < 2 or i == last else "---:" for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for _, k in COLUMNS) + " |" for r in rows]
    return "### EDropout: the paper's grid\n\n" + "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict[str, Any]], overrides: list[str]) -> None:
    from edrop_ray import store

    store.write_json(out / "paper_grid.json", {"overrides": overrides, "rows": rows})
    store.write_atomic(out / "paper_grid.md", grid_markdown(rows).encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edrop_ray.config import load_config
    from edrop_ray.data import load_datasets
    from edrop_ray.errors import UserError

    try:
        if any(o.split("=", 1)[0].strip() == "model" for o in args.overrides):
            raise UserError("--set model=... does not apply to the grid; pass --models NAME ...")
        plan = plan_rows(args)
        # every config with the overrides, before any run: a typo in --set fails at once
        configs = {
            (d, m): load_config(path, [*args.overrides, f"model={m}"]) for d, path, m in plan
        }
    except UserError as e:
        print(f"paper_grid: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    data_problem: dict[str, str | None] = {}  # per dataset: None when its data loads
    failed = False
    for dataset, _, model in plan:
        cfg = configs[(dataset, model)]
        if dataset not in data_problem:
            try:  # data does not depend on the model: check it once per dataset
                load_datasets(cfg.dataset, data_root=cfg.data_root, input_size=cfg.input_size,
                              download=cfg.download, seed=cfg.seed)  # fmt: skip
                data_problem[dataset] = None
            except UserError as e:
                data_problem[dataset] = str(e)
        if data_problem[dataset] is not None:
            rows.append(table_row(dataset, model, None, f"missing data: {data_problem[dataset]}"))
            print(f"[{dataset} x {model}] missing data: {data_problem[dataset]}", file=sys.stderr)
            write_table(out, rows, args.overrides)
            continue
        print(f"[{dataset} x {model}] running", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            report, how = run_row(cfg, out / "runs" / f"{dataset}-{model}", quiet=args.quiet)
            status = f"ok ({how}, {time.perf_counter() - t0:.0f} s)"
            rows.append(table_row(dataset, model, report, status))
        except UserError as e:
            rows.append(table_row(dataset, model, None, f"error: {e}"))
            failed = True
        except Exception as e:  # one broken row (out of memory, a bug) must not lose the others
            traceback.print_exc()
            rows.append(table_row(dataset, model, None, f"failed: {type(e).__name__}: {e}"))
            failed = True
        print(f"[{dataset} x {model}] {rows[-1]['status']}", file=sys.stderr)
        write_table(out, rows, args.overrides)
    write_table(out, rows, args.overrides)  # also when the plan is empty
    print(grid_markdown(rows))
    print(f"table: {out / 'paper_grid.md'} and {out / 'paper_grid.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
