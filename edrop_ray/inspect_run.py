"""``edrop-ray report | export | evaluate``: look at a finished run (or a sweep) after the fact.

* ``report PATH`` prints the summary table of a run (or the trials of a sweep) as markdown or JSON
  on stdout and (re)writes the plots: ``RUN_DIR/plots/*.png`` with ``kept_per_layer.png``, or
  ``SWEEP_DIR/pareto.png``. Only plots are written; the run's results are never touched.
* ``export RUN_DIR`` writes the physically slimmed model as a recipe file (``state_dict``), a
  TorchScript module or an ONNX graph, then reloads the file and checks that it computes what the
  slimmed model computes. An export is a derived file: an existing one is replaced, atomically and
  only once the new one has passed that check.
* ``evaluate RUN_DIR`` measures Top-1/Top-5 of the saved slimmed model on a test split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import store
from .config import Config, config_from_dict, load_config
from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, torchvision, pyarrow and matplotlib are imported inside the functions that use them,
# after the run folder and the arguments are checked: a bad input is answered in a blink.

__all__ = [
    "report_cli",
    "export_cli",
    "evaluate_cli",
    "EXPORT_SUFFIX",
    "CHECK_ATOL",
    "check_batch",
    "check_tolerance",
]

EXPORT_SUFFIX = {"state_dict": ".pt", "torchscript": ".ts", "onnx": ".onnx"}
CHECK_ATOL = 1e-4  # exported vs in-memory slimmed logits, on one deterministic batch; see below
_CHECK_BATCH = 8
_ONNX_HINT = (
    "onnx export needs the onnx and onnxscript packages (torch's default exporter uses both): "
    "pip install onnx onnxscript (and onnxruntime to check the exported numbers)"
)


# ---------------------------------------------------------------------------------------- report


def run_config(run_dir: Path) -> Config:
    """The config the run used: the copy in its marker (config.yaml may have been edited since);
    config.yaml for runs made before the marker held one."""
    recorded = store.read_marker(run_dir).get("config")
    if isinstance(recorded, dict):
        return config_from_dict(recorded, f"the marker of {str(run_dir)!r}")
    return load_config(run_dir / "config.yaml")


def report_cli(args: argparse.Namespace) -> int:
    """Print the table of a run or a sweep (``args.format``: md | json) and write its plots."""
    path = Path(args.path)
    fmt = getattr(args, "format", "md") or "md"
    # sweep.json first: a sweep folder may keep a copy of its base config.yaml, a run never
    # has a sweep.json
    if path.is_dir() and (path / "sweep.json").is_file():
        from .report.sweep import print_sweep_report

        return print_sweep_report(path, fmt)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _report_run(store.open_run_dir(path), fmt)
    raise UserError(
        f"{str(path)!r} is not a run or sweep directory (no .edrop_ray_run, report.json or "
        "sweep.json); pass the --out folder of a prune or a sweep"
    )


def _finished_report(run_dir: Path) -> dict[str, Any]:
    """The run's report.json; UserError when the run has not finished (or the file is damaged)."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(
            f"run {str(run_dir)!r} has not finished (no report.json); "
            f"resume it with: edrop-ray resume {run_dir}"
        )
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{str(path)!r} is not valid JSON ({type(e).__name__}); re-run the prune"
        ) from e
    missing = sorted(REPORT_KEYS - set(report)) if isinstance(report, dict) else ["all"]
    if missing:
        raise UserError(
            f"{str(path)!r} does not hold a run report (no {missing[0]!r}); re-run the prune"
        )
    for key in sorted(REPORT_KEYS - {"dataset", "model"}):
        if isinstance(report[key], bool) or not isinstance(report[key], int | float):
            raise UserError(f"{str(path)!r} is damaged ({key} is not a number); re-run the prune")
    return report


# what a report must hold for the summary table (report.summary_rows)
REPORT_KEYS = frozenset({
    "dataset", "model", "dense_top1", "dense_top5", "pruned_top1", "pruned_top5", "params_dense",
    "params_pruned", "macs_dense", "macs_pruned", "prune_rate", "generations", "wall_s",
})  # fmt: skip


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = run_dir / "history.parquet"
    if not path.is_file():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise UserError(
            f"{str(path)!r} is not a readable Parquet table ({type(e).__name__}); re-run the prune"
        ) from None


def _report_run(run_dir: Path, fmt: str) -> int:
    from . import report as rep

    report = _finished_report(run_dir)
    plots = rep.write_plots(run_dir, _read_history(run_dir))
    if report.get("kept_per_layer"):
        plots.append(rep.write_kept_per_layer_plot(run_dir, report["kept_per_layer"]))
    if fmt == "json":
        blob = {
            "kind": "run",
            "path": str(run_dir),
            "report": report,
            "plots": [str(p) for p in plots],
        }
        print(json.dumps(blob, indent=2, sort_keys=True))
    else:
        print(rep.summary_markdown(report))
    print(f"plots: {run_dir / 'plots'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- export


def _pruned_blob(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Path and recipe of the run's pruned_model.pt; UserError when the run has not finished."""
    path = run_dir / "pruned_model.pt"
    if not path.is_file():
        raise UserError(
            f"run {str(run_dir)!r} has no pruned_model.pt (it has not finished); "
            f"resume it with: edrop-ray resume {run_dir}"
        )
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: the same to the user
        raise UserError(
            f"{str(path)!r} is corrupt or not a pruned model ({type(e).__name__}); re-run the prune"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != "edrop_ray.pruned/1":
        raise UserError(f"{str(path)!r} is not an edrop_ray pruned model; re-run the prune")
    return path, blob


def check_batch(blob: dict[str, Any], n: int = _CHECK_BATCH) -> torch.Tensor:
    """A deterministic (n, C, H, W) batch of standard-normal inputs for the export check."""
    import torch

    g = torch.Generator().manual_seed(0)
    size = blob["input_size"]
    return torch.randn(n, blob["in_channels"], size, size, generator=g)


def check_tolerance(expected: torch.Tensor) -> float:
    """Largest |exported - slimmed| accepted: CHECK_ATOL, scaled by the logits' magnitude above 1.

    Another runtime (ONNX Runtime) sums in another order; float32 rounding then grows with the
    size of the logits (a barely trained model easily has logits in the hundreds), so a fixed
    absolute bound would fail exports that are correct.
    """
    return CHECK_ATOL * max(1.0, float(expected.abs().max()))


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; written onto it (:func:`edrop_ray.store.write_atomic`)
    when the block ends without error."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as d:
        tmp = Path(d) / target.name
        yield tmp
        store.write_atomic(target, tmp.read_bytes())


def export_cli(args: argparse.Namespace) -> int:
    """Write the run's slimmed model as ``args.format``; reload it and check it against the model.

    Formats:
      * ``state_dict``: the recipe of :func:`edrop_ray.slim.save_pruned` (architecture name,
        classes, input shape, mask and the slimmed ``state_dict``), loaded back with
        ``edrop_ray.slim.load_pruned(path)`` or read with ``torch.load(path, weights_only=True)``.
      * ``torchscript``: ``torch.jit.trace`` of the slimmed model, loaded with ``torch.jit.load``;
        needs no edrop_ray at all.
      * ``onnx``: ``torch.onnx.export`` (needs onnx and onnxscript), input ``input`` (N, C, H, W)
        with a dynamic batch, output ``logits``; checked with onnxruntime when it is installed.
    """
    fmt = args.format
    if fmt not in EXPORT_SUFFIX:
        raise UserError(f"--format must be one of {', '.join(EXPORT_SUFFIX)}, got {fmt!r}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(_ONNX_HINT)
    run_dir = store.open_run_dir(args.run_dir)
    if args.output is not None:
        if not args.output.strip():
            raise UserError("--output is empty; pass a file path, e.g. --output model.pt")
        output = Path(args.output).expanduser()
        if output.is_dir():
            raise UserError(f"--output {str(output)!r} is a folder; pass a file path")
    else:
        output = run_dir / "export" / f"model{EXPORT_SUFFIX[fmt]}"
    store.check_writable(output.parent, "--output", given=output)
    pruned_path, blob = _pruned_blob(run_dir)
    import torch

    from .slim import load_pruned

    model = load_pruned(pruned_path)  # one that cannot be rebuilt is refused before any write
    x = check_batch(blob)
    with torch.no_grad():
        expected = model(x)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _staged(output) as tmp:
            if fmt == "state_dict":
                got = _export_recipe(model, blob, tmp, x)
            elif fmt == "torchscript":
                got = _export_torchscript(model, tmp, x)
            else:
                got = _export_onnx(model, tmp, x)
            if got is None:
                print("check: skipped (onnxruntime is not installed: pip install onnxruntime)")
            else:
                diff = float((got - expected).abs().max())
                tol = check_tolerance(expected)
                ok = diff <= tol
                print(f"check: max |exported - slimmed| = {diff:.3g} on a batch of {len(x)} "
                      f"({'ok' if ok else 'FAILED'}, tolerance {tol:.3g})")  # fmt: skip
                if not ok:
                    raise _CheckFailed
    except _CheckFailed:  # a bug, not a user error: an earlier export at that path is kept
        print(f"edrop-ray: export check failed; {output} was not written", file=sys.stderr)
        return 1
    print(f"exported {fmt}: {output}")
    return 0


class _CheckFailed(Exception):
    """The reloaded export does not compute what the slimmed model computes."""


def _export_recipe(model: nn.Module, blob: dict, path: Path, x: torch.Tensor) -> torch.Tensor:
    import torch

    from .slim import load_pruned, save_pruned

    save_pruned(
        path,
        model,
        model_name=blob["model"],
        num_classes=blob["num_classes"],
        in_channels=blob["in_channels"],
        input_size=blob["input_size"],
        small_input=blob["small_input"],
        state=blob["mask"],
    )
    loaded = load_pruned(path)  # not under no_grad: rebuilding the slim model traces with autograd
    with torch.no_grad():
        return loaded(x)


def _export_torchscript(model: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    import torch

    print("note: torch deprecates TorchScript (torch.jit) in favour of torch.export; the file "
          "still loads with torch.jit.load", file=sys.stderr)  # fmt: skip
    with warnings.catch_warnings():  # said once above instead of four FutureWarnings
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(x)


def _export_onnx(model: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor | None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,  # one self-contained file (the grid's models are far below 2 GB)
        dynamo=True,
    )
    import onnx

    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": x.numpy()})
    return torch.from_numpy(out)


# -------------------------------------------------------------------------------------- evaluate


def load_datasets(*args, **kwargs):
    """:func:`edrop_ray.data.load_datasets`, imported on first use (it imports torchvision)."""
    from .data import load_datasets as load

    return load(*args, **kwargs)


def evaluate_cli(args: argparse.Namespace) -> int:
    """Top-1/Top-5 of the run's saved slimmed model on the test split of a dataset."""
    run_dir = store.open_run_dir(args.run_dir)
    cfg = run_config(run_dir)
    if cfg.model.startswith("custom:"):  # edrop_ray.prune() on a network and data in memory
        raise UserError(
            f"run {str(run_dir)!r} pruned your own network {cfg.model[7:]!r} from Python; the CLI "
            "cannot rebuild it: load it with edrop_ray.slim.load_pruned(path, model=<a new "
            "instance>) and evaluate it in Python"
        )
    pruned_path, blob = _pruned_blob(run_dir)
    dataset = args.dataset or cfg.dataset
    data_root = args.data_root or cfg.data_root
    try:
        _, test_set, info = load_datasets(
            dataset,
            data_root=data_root,
            input_size=blob["input_size"],
            download=cfg.download,
            seed=cfg.seed,
        )
    except UserError as e:  # data.py's hint names prune's flag; evaluate takes --data-root
        raise UserError(str(e).replace("pass --set download=true", "pass --data-root DIR")) from e
    if (info.num_classes, info.in_channels) != (blob["num_classes"], blob["in_channels"]):
        raise UserError(
            f"dataset {dataset!r} has {info.num_classes} classes and {info.in_channels} input "
            f"channel(s), but the model of {str(run_dir)!r} takes {blob['in_channels']} channel(s) "
            f"and predicts {blob['num_classes']} classes; pick a matching --dataset"
        )
    from .learner import resolve_device, test_batches
    from .slim import load_pruned
    from .train import evaluate

    device = resolve_device(cfg.device)
    model = load_pruned(pruned_path).to(device)
    result = evaluate(model, test_batches(test_set, cfg.eval_batch_size), device=device)
    print(
        f"{blob['model']} (pruned) on {dataset} test ({info.test_size} images): "
        f"Top-1 {result['top1']:.2f}%  Top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}"
    )
    return 0
