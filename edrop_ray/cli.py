"""``edrop-ray`` command line: prune, resume.

Every error a user can cause ends in one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cluster import start_ahead, stop_ahead
from .errors import RunInterrupted, UserError
from .memory import keep_heap_memory

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its error on one line (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        help="named settings applied after --config, before --set: paper (the paper's exact "
        "procedure: a generation every step, S = 16, ...)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edrop-ray", description="EDropout: energy-based dropout and pruning, on Ray."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("prune", help="prune a model with EDropout and report the result")
    p.add_argument("--config", help="YAML config (default: the embedded digits + ResNet-18 run)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set population_size=32 (repeatable)",
    )
    _add_preset(p)
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<model>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument(
        "--backend", choices=("local", "ray"), help="where energies are computed (config: backend)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line and no table")

    r = verbs.add_parser("resume", help="continue a stopped run from its last checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--quiet", action="store_true")

    s = verbs.add_parser("sweep", help="Ray Tune sweep of EDropout's hyper-parameters")
    s.add_argument("--config", required=True, help="base YAML config of every trial")
    s.add_argument("--space", required=True, help="YAML search space (see configs/space_*.yaml)")
    s.add_argument("--samples", type=int, default=8, help="trials to sample (default 8)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_preset(s)
    s.add_argument("--out", help="sweep folder, Tune's storage_path (default: runs/sweep-<time>)")
    s.add_argument("--quiet", action="store_true")

    c = verbs.add_parser("compare", help="EDropout against dense, magnitude and random pruning")
    c.add_argument("--config", help="YAML config (default: the embedded digits run)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_preset(c)
    c.add_argument("--out", help="folder for compare.json / compare.md / plot")
    c.add_argument(
        "--budget",
        choices=("equal-steps", "equal-finetune"),
        default="equal-steps",
        help="equal-steps: every arm trains the same total steps (default); equal-finetune: the "
        "pruning baselines fine-tune after the whole dense budget",
    )
    c.add_argument("--seeds", help="e.g. 0,1,2: every arm per seed, then mean ± std")
    c.add_argument(
        "--arms",
        help=(
            "comma-separated arms (dense and edropout always run): dense, edropout, magnitude, "
            "random, random-mask, edropout-s4, frozen-first-gen (the default set), and "
            "paper-schedule (evolve_every 1, S 16; only when named)"
        ),
    )
    c.add_argument(
        "--reuse", action="store_true", help="with --seeds: keep seeds already finished in --out"
    )
    c.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    c.add_argument(
        "--backend", choices=("local", "ray"), help="where energies are computed (config: backend)"
    )
    c.add_argument("--quiet", action="store_true")

    rp = verbs.add_parser("report", help="summary table and plots of a run or a sweep")
    rp.add_argument("path", help="a run directory or a sweep directory")
    rp.add_argument("--format", choices=("md", "json"), default="md")

    e = verbs.add_parser("export", help="export the physically slimmed model of a run")
    e.add_argument("run_dir")
    e.add_argument("--format", choices=("torchscript", "onnx", "state_dict"), default="state_dict")
    e.add_argument("--output", help="file to write (default: RUN_DIR/export/model.<ext>)")

    v = verbs.add_parser("evaluate", help="Top-1/Top-5 of a run's saved pruned model")
    v.add_argument("run_dir")
    v.add_argument("--dataset", help="data set to evaluate on (default: the run's own)")
    v.add_argument("--data-root", help="data root (default: the run's own)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .config import load_config, read_yaml, validate

    if args.verb == "prune":
        # no --config: the built-in defaults, which are configs/digits_resnet18.yaml
        cfg = load_config(args.config, _overrides(args), names=False)
        out = _out(args) or f"runs/{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        from . import store

        store.check_out(out, overwrite=args.overwrite)  # answered before torch is imported
        start_ahead(cfg)  # on Ray, a private instance boots while this process goes on
        from . import job  # heavy imports (torch, torchvision) only once the input is good

        validate(cfg)  # the model and dataset names: their registries import torchvision
        job.prune(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
        if not args.quiet:
            print(f"run directory: {out}")
        return 0
    if args.verb == "resume":
        from . import store

        run_dir = store.open_resumable(args.run_dir)  # answered before torch is imported
        _start_ahead_from(run_dir / "config.yaml")
        from . import job

        job.resume(args.run_dir, quiet=args.quiet)
        return 0
    if args.verb == "sweep":
        args.overrides = _overrides(args)
        load_config(args.config, args.overrides, names=False)  # checks without torch or Ray
        _out(args)
        read_yaml(Path(args.space), "space", "--space")  # a binary or broken file: one line
        from .tune import run_sweep_cli

        return run_sweep_cli(args)
    if args.verb == "compare":
        args.overrides = _overrides(args)
        load_config(args.config, args.overrides, names=False)  # checks without torch
        if _out(args):
            from . import store

            if getattr(args, "reuse", False) and getattr(args, "seeds", None):
                store.check_reuse_out(args.out)  # other processes may be adding their seeds
            else:
                store.check_out(args.out, overwrite=args.overwrite, kind="compare")
        from .compare_cli import run_compare_cli

        return run_compare_cli(args)
    if args.verb in ("report", "export", "evaluate"):
        from . import inspect_run

        return getattr(inspect_run, f"{args.verb}_cli")(args)
    raise AssertionError(args.verb)


def _start_ahead_from(config_file: Path) -> None:
    """:func:`start_ahead` for a run's own config file (the checkpoint's config, which resume
    checks it against); a file that does not read leaves it to resume to say so."""
    from .config import load_config

    try:
        cfg = load_config(config_file, names=False)
    except (UserError, OSError):
        return
    if not cfg.model.startswith("custom:"):  # resume refuses those (a network from Python)
        start_ahead(cfg)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--preset, then --set, then --backend (the flag wins over the config and --set)."""
    from .config import preset_overrides

    overrides = [*preset_overrides(getattr(args, "preset", None)), *args.overrides]
    if getattr(args, "backend", None):
        overrides.append(f"backend={args.backend}")
    return overrides


def _out(args: argparse.Namespace) -> str | None:
    """--out as given; an empty --out is refused rather than read as "no --out"."""
    out = getattr(args, "out", None)
    if out is not None and not out.strip():
        raise UserError("--out is empty; pass a folder path, e.g. --out runs/my-run")
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_heap_memory()  # this process is the tool's own: freed activations stay in its heap
    try:
        return _run(args)
    except UserError as e:
        print(f"edrop-ray: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk full, a folder gone mid-run: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"edrop-ray: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        if e.run_dir is None:
            print(f"edrop-ray: interrupted before the first checkpoint; {e.out} is as it was",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"edrop-ray: interrupted; the last checkpoint is kept: continue with "
                  f"edrop-ray resume {e.run_dir}", file=sys.stderr)  # fmt: skip
        return 130
    except KeyboardInterrupt:
        print("edrop-ray: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_ahead()  # a Ray started ahead that no run took (the run failed before it)


if __name__ == "__main__":
    sys.exit(main())
