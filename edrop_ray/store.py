"""Run directory: resolved config, atomic checkpoints, Parquet history and population snapshots.

Every file is written aside and renamed into place, so a crash never leaves a half-written file
where a good one stood, and the previous checkpoint survives until the new one is complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from .errors import UserError

__all__ = [
    "RUN_MARKERS",
    "prepare_run_dir",
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

# A folder holding any of these is a run; it is never overwritten without --overwrite.
RUN_MARKERS = ("config.yaml", "report.json", "checkpoint.pt")
CHECKPOINT = "checkpoint.pt"


def prepare_run_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Create ``out`` for a new run; refuse a folder that already holds a run unless overwrite."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(path)!r} is a file; pass a folder path")
    if path.is_dir() and any((path / m).exists() for m in RUN_MARKERS):
        if not overwrite:
            raise UserError(
                f"--out {str(path)!r} already holds a run; pick another --out or pass --overwrite"
            )
        for m in (*RUN_MARKERS, "history.parquet", "population.parquet", "mask.pt",
                  "pruned_model.pt", "plots"):  # fmt: skip
            target = path / m
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run_dir(path: str | Path) -> Path:
    """An existing run directory (for resume, report, export); UserError if it is not one."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.yaml").is_file():
        raise UserError(f"{str(p)!r} is not a run directory (no config.yaml); pass a run's folder")
    return p


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through :func:`write_atomic` (load it back with ``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_yaml(path: Path, obj: Any) -> None:
    write_atomic(path, yaml.safe_dump(obj, sort_keys=False).encode())


def _write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-generation metrics, one row per generation."""
    _write_table(path, pa.Table.from_pylist(rows))


def pack_states(states: torch.Tensor) -> list[bytes]:
    """(S, D) bool -> S bit-packed byte strings (D/8 bytes each)."""
    bits = states.cpu().numpy().astype(np.uint8)
    return [np.packbits(row).tobytes() for row in bits]


def unpack_states(packed: list[bytes], num_units: int) -> torch.Tensor:
    rows = [np.unpackbits(np.frombuffer(b, dtype=np.uint8))[:num_units] for b in packed]
    return torch.from_numpy(np.stack(rows).astype(bool))


def write_population(path: Path, rows: list[dict[str, Any]]) -> None:
    """Population snapshots: columns generation, member, energy, num_units, bits (packed)."""
    schema = pa.schema(
        [
            ("generation", pa.int64()),
            ("member", pa.int64()),
            ("energy", pa.float64()),
            ("num_units", pa.int64()),
            ("bits", pa.binary()),
        ]
    )
    _write_table(path, pa.Table.from_pylist(rows, schema=schema))


def snapshot_rows(generation: int, states: torch.Tensor, energies: torch.Tensor) -> list[dict]:
    """Rows of one population snapshot for :func:`write_population`."""
    packed = pack_states(states)
    return [
        {
            "generation": generation,
            "member": i,
            "energy": float(energies[i]),
            "num_units": int(states.shape[1]),
            "bits": packed[i],
        }
        for i in range(states.shape[0])
    ]


def read_population(path: Path) -> dict[int, torch.Tensor]:
    """generation -> (S, D) bool states, from a population.parquet file."""
    table = pq.read_table(path).to_pylist()
    by_gen: dict[int, list[dict]] = {}
    for row in table:
        by_gen.setdefault(row["generation"], []).append(row)
    return {
        g: unpack_states(
            [r["bits"] for r in sorted(rows, key=lambda r: r["member"])], rows[0]["num_units"]
        )  # fmt: skip
        for g, rows in by_gen.items()
    }


def save_checkpoint(run_dir: Path, blob: dict[str, Any]) -> None:
    """Atomically replace ``checkpoint.pt`` (the old one stays whole until the new one is)."""
    path = run_dir / CHECKPOINT
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".checkpoint.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` with ``weights_only=True``; UserError when missing or corrupt."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no checkpoint.pt to resume from; start a new run")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file: all the same to the user
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}); "
            "restore it from a copy or start a new run"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != "edrop_ray.checkpoint/1":
        raise UserError(f"{str(path)!r} is not an edrop_ray checkpoint; start a new run")
    return blob
