"""File formats of a run: the one atomic writer, JSON/YAML/torch files, Parquet tables, checkpoints.

Every file is written aside and renamed into place (:func:`write_atomic`), so a crash never leaves
a half-written file where a good one stood, and the previous checkpoint survives until the new
one is complete. Which folder the files go to, and what a folder may hold, is :mod:`.store`'s.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import yaml

from .errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

# numpy, pyarrow and torch are imported where they are used: checking an output folder (the
# CLI does it before anything heavy is loaded) must not pay for them.

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "write_atomic",
    "write_json",
    "write_yaml",
    "save_torch",
    "write_history",
    "write_population",
    "snapshot_rows",
    "read_population",
    "save_checkpoint",
    "load_checkpoint",
    "pack_rows",
    "unpack_rows",
    "pack_states",
    "unpack_states",
]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "edrop_ray.checkpoint/1"


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    ``data`` is the bytes, or a function that writes them to the open file (a checkpoint is
    streamed, not held twice in memory). The old file stays whole until the new one is.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files follow the umask
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through :func:`write_atomic` (load it back with ``weights_only=True``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_yaml(path: Path, obj: Any) -> None:
    write_atomic(path, yaml.safe_dump(obj, sort_keys=False).encode())


def _write_table(path: Path, table: pa.Table) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-generation metrics, one row per generation."""
    import pyarrow as pa

    _write_table(path, pa.Table.from_pylist(rows))


def pack_rows(states: torch.Tensor):
    """(S, D) bool -> (S, ceil(D/8)) uint8 numpy array, one bit-packed row per state."""
    import numpy as np

    # a bool array is bytes of 0 and 1 already: viewed, not copied
    return np.packbits(states.cpu().contiguous().numpy().view(np.uint8), axis=1)


def unpack_rows(rows, num_units: int) -> torch.Tensor:
    """The reverse of :func:`pack_rows`: (S, ceil(D/8)) uint8 -> (S, D) bool (CPU)."""
    import numpy as np
    import torch

    bits = np.unpackbits(np.asarray(rows, dtype=np.uint8), axis=1, count=num_units)
    return torch.from_numpy(bits.view(bool))  # bytes of 0 and 1: viewed, not copied


def pack_states(states: torch.Tensor) -> list[bytes]:
    """(S, D) bool -> S bit-packed byte strings (D/8 bytes each)."""
    return [row.tobytes() for row in pack_rows(states)]


def unpack_states(packed: list[bytes], num_units: int) -> torch.Tensor:
    import numpy as np

    return unpack_rows(np.stack([np.frombuffer(b, dtype=np.uint8) for b in packed]), num_units)


def write_population(path: Path, rows: list[dict[str, Any]]) -> None:
    """Population snapshots: columns generation, member, energy, num_units, bits (packed)."""
    import pyarrow as pa

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
    import pyarrow.parquet as pq

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
    import torch

    write_atomic(run_dir / CHECKPOINT, lambda f: torch.save(blob, f))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` with ``weights_only=True``; UserError when missing or corrupt."""
    import torch

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
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{str(path)!r} is not an edrop_ray checkpoint; start a new run")
    return blob
