"""The search space of ``edrop-ray sweep``: read, checked against the config, turned into Tune's.

Space YAML: ``key: spec`` where key is one of :data:`SEARCHABLE` and spec is ``{choice: [..]}``,
``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends
included) or a plain list (a grid: every value is run, ``--samples`` times each).

Everything here but :func:`to_param_space` runs without Ray (a bad space is refused before Ray
starts); that function imports ``ray.tune`` when called.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from .config import Config, _coerce, _field_types, validate
from .errors import UserError

__all__ = [
    "SEARCHABLE",
    "DISTRIBUTIONS",
    "load_space",
    "check_space",
    "to_param_space",
    "grid_size",
    "plain",
]

# Config fields a space may search over.
SEARCHABLE = (
    "population_size", "F", "CR", "mutation", "kappa", "sparsity_lambda", "target_prune_rate",
    "evolve_every", "p0", "energy_batch_size", "patience", "diversity_threshold", "lr",
    "momentum", "weight_decay",
)  # fmt: skip
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def plain(v: Any) -> Any:
    """numpy scalars (Tune's draws) as Python values."""
    return v.item() if hasattr(v, "item") and not isinstance(v, str | bytes) else v


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a space YAML file (not yet checked: see :func:`check_space`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"space file {str(p)!r} not found; pass an existing --space FILE")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"space file {str(p)!r} is not valid YAML: {e}".splitlines()[0]) from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"space file {str(p)!r} must hold a mapping of key: distribution")
    return loaded


def _check_value(base: Config, key: str, value: Any, source: str) -> Any:
    """``value`` coerced to ``key``'s type and validated against ``base``; UserError if not."""
    try:
        v = _coerce(key, value)
        validate(dataclasses.replace(base, **{key: v}))
    except UserError as e:
        why = str(e).split("; e.g. --set")[0]
        raise UserError(f"{source}: {key} value {value!r} is invalid: {why}") from None
    return v


def _pair(key: str, name: str, spec: Any, source: str) -> tuple[float, float]:
    ok = (
        isinstance(spec, list | tuple)
        and len(spec) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in spec)
    )
    if not ok or not spec[0] < spec[1]:
        raise UserError(f"{source}: {key}: {{{name}: [lo, hi]}} needs two numbers with lo < hi, "
                        f"got {spec!r}")  # fmt: skip
    return spec[0], spec[1]


def check_space(space: Any, base: Config, source: str = "--space") -> dict[str, tuple[str, Any]]:
    """Validate a raw space against ``base``: ``{key: (distribution, args)}`` or UserError.

    Every value a distribution can produce is checked with the config's own validation (each
    field's valid set is an interval or a set of choices, so the ends and the choices suffice).
    """
    if not isinstance(space, dict):
        raise UserError(f"{source}: the space must be a mapping of key: distribution")
    if not space:
        raise UserError(
            f"{source}: the search space is empty; give at least one of: {', '.join(SEARCHABLE)}"
        )
    fields = _field_types()
    checked: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        if key not in SEARCHABLE:
            what = "is not searchable" if key in fields else "is not a config key"
            raise UserError(f"{source}: {key!r} {what}; searchable keys: {', '.join(SEARCHABLE)}")
        kind = str(fields[key]).split("|")[0].strip()
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{source}: {key}: a grid (plain list) needs at least one value")
            checked[key] = ("grid", [_check_value(base, key, v, source) for v in spec])
            continue
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise UserError(
                f"{source}: {key}: expected {{choice: [..]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}} or a plain list, got {spec!r}"
            )
        name, args = next(iter(spec.items()))
        if name not in DISTRIBUTIONS:
            raise UserError(
                f"{source}: {key}: unknown distribution {name!r}; use one of "
                f"{', '.join(DISTRIBUTIONS)}, or a plain list for a grid"
            )
        if name == "choice":
            if not isinstance(args, list) or not args:
                raise UserError(f"{source}: {key}: {{choice: [..]}} needs a non-empty list")
            checked[key] = (name, [_check_value(base, key, v, source) for v in args])
            continue
        lo, hi = _pair(key, name, args, source)
        if name in ("uniform", "loguniform"):
            if kind != "float":
                raise UserError(
                    f"{source}: {key} takes {kind} values; {name} draws floats: use "
                    f"{'randint or ' if kind == 'int' else ''}choice"
                )
            if name == "loguniform" and lo <= 0:
                raise UserError(f"{source}: {key}: loguniform needs 0 < lo < hi, got {args!r}")
            checked[key] = (name, (_check_value(base, key, lo, source),
                                   _check_value(base, key, hi, source)))  # fmt: skip
        else:  # randint, both ends included
            if kind not in ("int", "float") or not all(float(x).is_integer() for x in (lo, hi)):
                raise UserError(f"{source}: {key}: randint needs integer ends and a numeric key, "
                                f"got {args!r}")  # fmt: skip
            _check_value(base, key, lo, source)
            _check_value(base, key, hi, source)
            checked[key] = (name, (int(lo), int(hi)))
    return checked


def to_param_space(checked: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Tune's ``param_space`` entries for a checked space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, (name, args) in checked.items():
        if name == "grid":
            out[key] = tune.grid_search(list(args))
        elif name == "choice":
            out[key] = tune.choice(list(args))
        elif name == "uniform":
            out[key] = tune.uniform(*args)
        elif name == "loguniform":
            out[key] = tune.loguniform(*args)
        else:
            out[key] = tune.randint(args[0], args[1] + 1)  # Tune's upper end is exclusive
    return out


def grid_size(checked: dict[str, tuple[str, Any]]) -> int:
    """How many grid points a checked space has (1 without a grid)."""
    return math.prod(len(args) for name, args in checked.values() if name == "grid")
