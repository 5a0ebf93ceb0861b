"""The user's own code by import path: ``package.module:callable``, as Ray Train/Tune entry points.

``model`` and ``dataset`` take such a path. Its syntax is checked when the config is loaded (no
import, no torch); the import itself happens when the run needs the object, in every process that
needs it (the driver and each Ray actor), with the current working directory on ``sys.path`` the
way ``ray job submit --working-dir .`` runs the job from that folder.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .errors import UserError

__all__ = [
    "is_import_path",
    "check_import_path",
    "resolve_callable",
    "module_file",
    "describe_exception",
]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PATTERN = re.compile(rf"{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*")


def is_import_path(text: str) -> bool:
    """Whether ``text`` is meant as an import path (it holds a ``:``), right or wrong."""
    return ":" in text


def check_import_path(key: str, text: str) -> None:
    """The syntax of ``package.module:callable``; a UserError naming ``key`` when it is wrong."""
    if not _PATTERN.fullmatch(text):
        raise UserError(
            f"{key} {text!r} is not an import path package.module:callable; "
            f"e.g. --set {key}=examples.user_model:{'make' if key == 'model' else 'digits'}"
        )


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line and at most 200 characters."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _put_cwd_on_path() -> str:
    cwd = os.getcwd()
    if cwd not in sys.path:  # what `python -m` and `ray job submit --working-dir .` give
        sys.path.insert(0, cwd)
    return cwd


def module_file(text: str) -> str | None:
    """The source file of an import path's module, found without running the module itself
    (its parent packages are imported); None when it cannot be found.

    For a timm model (``timm:<name>``) it is timm's ``version.py``: the dense cache key, which
    hashes this file, changes with the timm release that builds the model."""
    import importlib.util

    _put_cwd_on_path()
    try:
        spec = importlib.util.find_spec(text.partition(":")[0])
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if text.startswith("timm:") and origin:
        version = os.path.join(os.path.dirname(origin), "version.py")
        return version if os.path.isfile(version) else origin
    return origin


def resolve_callable(key: str, text: str) -> Callable[..., Any]:
    """Import ``package.module:callable`` and return the callable; one UserError line if not."""
    check_import_path(key, text)
    module_name, _, attr = text.partition(":")
    cwd = _put_cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(
            f"{key} {text!r}: no module named {e.name or module_name!r} importable from {cwd}; "
            "run from the folder that holds the package (ray job submit --working-dir .)"
        ) from None
    except Exception as e:  # the user's module raised while it was imported
        raise UserError(
            f"{key} {text!r}: importing {module_name!r} failed ({describe_exception(e)})"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{key} {text!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{key} {text!r} is a {type(obj).__name__}, not a callable")
    return obj
