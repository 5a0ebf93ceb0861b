"""Run files: the one atomic writer (bytes or a streaming writer) and the packed states."""

import pytest
import torch

from edrop_ray import files, store


def test_write_atomic_takes_bytes_or_a_writer_and_leaves_no_temp_file(tmp_path):
    files.write_atomic(tmp_path / "a.bin", b"abc")
    files.write_atomic(tmp_path / "b.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == b"abc"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.write_atomic(tmp_path / "a.bin", fail)
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_packed_states_round_trip():
    states = torch.rand(5, 37, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(files.unpack_states(files.pack_states(states), 37), states)


def test_a_checkpoint_written_through_store_reads_back(tmp_path):
    store.save_checkpoint(tmp_path, {"format": store.CHECKPOINT_FORMAT, "step": 3})
    assert files.load_checkpoint(tmp_path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [files.CHECKPOINT]
