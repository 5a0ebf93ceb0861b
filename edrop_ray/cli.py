"""``edrop-ray`` command line: prune, resume.

Every error a user can cause ends in one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UserError

__all__ = ["build_parser", "main"]

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<model>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument(
        "--backend", choices=("local", "ray"), help="where energies are computed (config: backend)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line and no table")

    r = verbs.add_parser("resume", help="continue a stopped run from its last checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--quiet", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    from . import job  # heavy imports (torch, torchvision) only once arguments are good
    from .config import load_config

    if args.verb == "prune":
        # no --config: the built-in defaults, which are configs/digits_resnet18.yaml
        config = args.config
        overrides = list(args.overrides)
        if args.backend:
            overrides.append(f"backend={args.backend}")
        cfg = load_config(config, overrides)
        out = args.out or f"runs/{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        job.prune(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
        if not args.quiet:
            print(f"run directory: {out}")
        return 0
    if args.verb == "resume":
        job.resume(args.run_dir, quiet=args.quiet)
        return 0
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"edrop-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edrop-ray: interrupted; the last checkpoint is kept (edrop-ray resume DIR)",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
