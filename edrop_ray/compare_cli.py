"""``edrop-ray compare``'s command line: seeds, arms and budget from the arguments, then
:func:`edrop_ray.compare.compare` (one seed) or :func:`edrop_ray.compare.compare_seeds`."""

from __future__ import annotations

import time

from .compare import DEFAULT_ARMS, METHODS, REQUIRED, compare, compare_seeds
from .config import load_config
from .errors import UserError

__all__ = ["run_compare_cli", "parse_seeds"]


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
