"""Run folders: what a folder holds, checking an --out, staging, committing and resuming a run.

A run or a comparison is written into a staged folder beside ``--out`` and renamed into place
when complete (:func:`stage_out`, :func:`commit_out`); a folder is recognised by its marker.
The files themselves, and the one atomic writer, are :mod:`.files`'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# The file formats are re-exported here: the run path writes a run's files through ``store``.
from .files import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    load_checkpoint,
    pack_states,
    read_population,
    save_checkpoint,
    save_torch,
    snapshot_rows,
    unpack_states,
    write_atomic,
    write_history,
    write_json,
    write_population,
    write_yaml,
)

__all__ = [
    "RUN_MARKERS",
    "MARKER",
    "folder_kind",
    "read_marker",
    "check_out",
    "check_reuse_out",
    "mark_out",
    "check_writable",
    "stage_out",
    "commit_out",
    "abandon_out",
    "prepare_run_dir",
    "open_resumable",
    "open_run_dir",
    "write_atomic",
    "write_json",
    "save_torch",
    "write_history",
    "write_population",
    "write_yaml",
    "snapshot_rows",
    "read_population",
    "save_checkpoint",
    "load_checkpoint",
    "pack_states",
    "unpack_states",
]

# A run folder identifies itself with this marker, written by this tool before anything else.
MARKER = ".edrop_ray_run"
RUN_FORMAT = "edrop_ray.run/1"
# Files a run (kind "run") or a comparison (kind "compare") of this tool writes in its folder;
# --overwrite replaces a folder only when it holds nothing else.
RUN_FILES = frozenset({
    MARKER, "config.yaml", "report.json", "history.parquet", "population.parquet", "mask.pt",
    "pruned_model.pt", CHECKPOINT, "plots", "export",
})  # fmt: skip
COMPARE_FILES = frozenset(
    {MARKER, "compare.json", "compare.md", "accuracy_vs_params.png", "edropout"}
)
# report.json of a run made before the marker existed: recognised by these keys.
_REPORT_KEYS = frozenset({"dense_top1", "pruned_top1", "params_pruned", "prune_rate"})
RUN_MARKERS = (MARKER, "report.json", CHECKPOINT)  # kept for callers that look for a run
# the folder of one seed in a multi-seed comparison (compare --seeds): OUT/seed<N>
SEED_DIR = re.compile(r"seed[0-9]+")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker of a run folder ({} when there is none or it is unreadable)."""
    m = _read_json(Path(path) / MARKER)
    return m if isinstance(m, dict) else {}


def folder_kind(path: Path) -> str | None:
    """``"run"`` or ``"compare"`` when ``path`` was made by this tool, else None.

    A folder is this tool's when it holds the marker, or (runs made before the marker existed)
    a ``report.json`` with this tool's keys, a ``checkpoint.pt`` with this tool's format, or a
    ``compare.json`` with this tool's format.
    """
    marker = _read_json(path / MARKER)
    if isinstance(marker, dict) and str(marker.get("format", "")).startswith("edrop_ray.run/"):
        return "compare" if marker.get("kind") == "compare" else "run"
    report = _read_json(path / "report.json")
    if isinstance(report, dict) and _REPORT_KEYS <= set(report):
        return "run"
    comp = _read_json(path / "compare.json")
    if isinstance(comp, dict) and comp.get("format") == "edrop_ray.compare/1":
        return "compare"
    if (path / CHECKPOINT).is_file():
        import torch

        try:
            blob = torch.load(path / CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception:  # any unreadable file is not proof of a run
            return None
        if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT:
            return "run"
    return None


def _foreign(path: Path, kind: str) -> list[str]:
    """Entries of a folder of ``kind`` that this tool did not write (sorted)."""
    own = COMPARE_FILES if kind == "compare" else RUN_FILES
    out = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp"):
            continue  # a temporary file of write_atomic / save_checkpoint
        if kind == "compare" and SEED_DIR.fullmatch(name) and entry.is_dir():
            # one seed's comparison of a multi-seed one (compare --seeds)
            if folder_kind(entry) != "compare":
                out.append(f"{name}/")
            else:
                out += [f"{name}/{n}" for n in _foreign(entry, "compare")]
        elif name not in own:
            out.append(name)
        elif name == "plots" and entry.is_dir():
            out += [f"plots/{p.name}" for p in sorted(entry.iterdir()) if p.suffix != ".png"]
        elif name == "export" and entry.is_dir():
            out += [f"export/{p.name}" for p in sorted(entry.iterdir()) if p.stem != "model"]
        elif name == "edropout" and entry.is_dir():
            if folder_kind(entry) != "run":
                out.append("edropout/")
            else:
                out += [f"edropout/{n}" for n in _foreign(entry, "run")]
    return out


def _stage_path(out: Path) -> Path:
    out = Path(os.path.abspath(out))  # "." and "runs/demo/.." have a real name to stage beside
    return out.parent / f"{out.name}.new"


def check_writable(path: Path, flag: str, given: Path | None = None) -> None:
    """The nearest existing folder at or above ``path`` must be a writable folder (``given``:
    the path as the user wrote it, for the message)."""
    p = path
    path = given if given is not None else path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {str(path)!r} is under the file {str(p)!r}; pass a folder path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: the folder {str(p)!r} is not writable; "
                        f"pick another {flag}")  # fmt: skip


def _writable_folder(out: str | Path, flag: str) -> Path:
    """``out`` as a path that is not a file and can be written to (it may not exist yet)."""
    if str(out).strip() == "":
        raise UserError(f"{flag} is empty; pass a folder path, e.g. {flag} runs/my-run")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file; pass a folder path")
    check_writable(path, flag)
    return path


def check_out(out: str | Path, *, overwrite: bool, kind: str = "run", flag: str = "--out") -> Path:
    """Check that a new run (or comparison) may be written to ``out``; write nothing.

    ``out`` may be missing, an empty folder, or (with ``overwrite``) a folder of this tool's
    of the same kind that holds nothing else. UserError otherwise, naming what is in the way.
    """
    path = _writable_folder(out, flag)
    if not path.is_dir():
        return path
    try:
        entries = sorted(e.name for e in path.iterdir())
    except OSError as e:
        raise UserError(f"{flag} {str(path)!r} cannot be read ({e.strerror}); pick another "
                        f"{flag}") from None  # fmt: skip
    if not entries:
        return path
    found = folder_kind(path)
    what = "a comparison" if kind == "compare" else "a run"
    if found is None and kind == "compare" and (path / "edropout").is_dir():
        raise UserError(
            f"{flag} {str(path)!r} holds an unfinished comparison without this tool's marker "
            f"(edropout/ but no {MARKER}); nothing there was touched, and --overwrite replaces "
            "only marked folders: remove it yourself or pick another " + flag
        )
    if found is None:
        raise UserError(
            f"{flag} {str(path)!r} is not an edrop_ray run folder (it holds {entries[0]!r} and "
            f"no {MARKER}); nothing there was touched: pick a new or empty folder"
        )
    if found != kind:
        other = "a comparison" if found == "compare" else "a run"
        raise UserError(f"{flag} {str(path)!r} holds {other}, not {what}; pick another {flag}")
    if not overwrite:
        raise UserError(
            f"{flag} {str(path)!r} already holds {what}; pick another {flag} or pass --overwrite"
        )
    foreign = _foreign(path, kind)
    if foreign:
        raise UserError(
            f"{flag} {str(path)!r} holds {what} and also {foreign[0]!r}, which edrop_ray did not "
            "write; --overwrite replaces only its own files: move it out or pick another " + flag
        )
    stage = _stage_path(path)
    check_writable(stage.parent, flag)
    if stage.exists():
        m = _read_json(stage / MARKER) if stage.is_dir() else None
        if not (isinstance(m, dict) and m.get("replaces") == stage.name.removesuffix(".new")):
            raise UserError(
                f"{str(stage)!r} is in the way (--overwrite writes the new run there and swaps "
                "it in at the end); move it or pick another " + flag
            )
    return path


def check_reuse_out(out: str | Path, flag: str = "--out") -> Path:
    """Check that the seeds of a multi-seed comparison may be added to (or summarised in) ``out``
    (``compare --seeds ... --reuse``): missing, empty, or holding only this tool's comparison
    files and ``seed<N>`` folders (also while other processes add their seeds). Writes nothing."""
    path = _writable_folder(out, flag)
    if not path.is_dir():
        return path
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name in COMPARE_FILES or (name.startswith(".") and name.endswith(".tmp")):
            continue
        if entry.is_dir() and SEED_DIR.fullmatch(name.removesuffix(".new")):
            continue  # a seed's comparison, finished or being written by another process
        raise UserError(
            f"{flag} {str(path)!r} holds {name!r}, which is not part of a comparison of this "
            "tool; nothing there was touched: pick a new or empty folder for --reuse"
        )
    return path


def mark_out(path: str | Path, kind: str) -> None:
    """Give a folder this tool made in place (a multi-seed comparison) its marker, once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not read_marker(path):
        write_json(path / MARKER, {"format": RUN_FORMAT, "kind": kind, "created": True})


def stage_out(out: str | Path, *, kind: str = "run", config: dict | None = None) -> Path:
    """The folder a new run (or comparison) is written to; call after :func:`check_out`.

    A missing or empty ``out`` is written in place. A run already in ``out`` stays untouched:
    the new one goes to the sibling ``OUT.new`` and :func:`commit_out` swaps it in at the end.
    """
    path = Path(out).expanduser()
    marker: dict[str, Any] = {"format": RUN_FORMAT, "kind": kind}
    if config is not None:
        marker["config"] = config  # the config the run used, whatever config.yaml says later
    if path.is_dir() and any(path.iterdir()):
        stage = _stage_path(path)
        if stage.exists():  # an abandoned earlier attempt to replace the same run: ours
            shutil.rmtree(stage)
        marker["replaces"] = stage.name.removesuffix(".new")
        path = stage
    marker["created"] = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / MARKER, marker)
    return path


def commit_out(path: str | Path) -> Path:
    """Swap a staged run into the folder it replaces (no-op for a run written in place).

    The old folder is removed only once the new one is complete and in its place.
    """
    path = Path(path)
    marker = _read_json(path / MARKER)
    if not isinstance(marker, dict) or not marker.get("replaces"):
        return path
    target = path.parent / marker["replaces"]
    kind = marker.get("kind", "run")
    if target.is_dir() and (folder_kind(target) != kind or _foreign(target, kind)):
        raise UserError(
            f"the new result is complete in {str(path)!r}, but {str(target)!r} changed while it "
            "ran and now holds other files; nothing was replaced: move the files yourself"
        )
    trash = path.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, trash)
    os.rename(path, target)
    marker.pop("replaces")
    write_json(target / MARKER, marker)
    shutil.rmtree(trash, ignore_errors=True)
    return target


def abandon_out(path: str | Path) -> bool:
    """After a failed or interrupted new run: keep it when it can be resumed (True), else put
    the disk back as it was (the folder removed, or emptied of this tool's files if it was an
    empty folder of the user's) and return False."""
    path = Path(path)
    if (path / CHECKPOINT).is_file() or not path.is_dir():
        return path.is_dir()
    marker = _read_json(path / MARKER)
    if not isinstance(marker, dict):
        return True  # not ours to remove
    if marker.get("created", False) or marker.get("replaces"):
        shutil.rmtree(path, ignore_errors=True)
    else:
        for entry in path.iterdir():
            if entry.name in RUN_FILES or entry.name in COMPARE_FILES:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return False


def prepare_run_dir(out: str | Path, *, overwrite: bool) -> Path:
    """:func:`check_out` then :func:`stage_out`: the folder to write a new run to."""
    check_out(out, overwrite=overwrite)
    return stage_out(out)


def open_run_dir(path: str | Path) -> Path:
    """An existing run directory (for resume, report, export); UserError if it is not one."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.yaml").is_file():
        raise UserError(f"{str(p)!r} is not a run directory (no config.yaml); pass a run's folder")
    if not any((p / name).is_file() for name in RUN_MARKERS) and not _resolved_config(p):
        raise UserError(
            f"{str(p)!r} is not a run directory (no {MARKER}, report.json, checkpoint.pt or "
            "resolved config.yaml); pass the --out folder of a prune"
        )
    return p


# Keys every resolved config.yaml this tool has written holds (a stopped run of an earlier
# version is recognised by them); a config.yaml of the user's own rarely has them all.
_CORE_KEYS = frozenset({"dataset", "model", "population_size", "p0", "mutation", "F", "CR",
                        "kappa", "evolve_every", "patience", "backend"})  # fmt: skip


def _resolved_config(path: Path) -> bool:
    try:
        loaded = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return False
    return isinstance(loaded, dict) and _CORE_KEYS <= set(loaded)


def open_resumable(path: str | Path) -> Path:
    """A run directory that has not finished and has a checkpoint; UserError otherwise."""
    p = open_run_dir(path)
    if (p / "report.json").is_file():
        raise UserError(
            f"run {str(p)!r} is finished (report.json exists); nothing to resume: see "
            f"edrop-ray report {p}"
        )
    if not (p / CHECKPOINT).is_file():
        raise UserError(f"{str(p)!r} has no checkpoint.pt to resume from; start a new run")
    return p
