"""The dense baseline's cache is keyed by config, package version and the data it saw."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from edrop_ray import job
from edrop_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def _sets(shift: float = 0.0):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=g) + shift
    y = torch.randint(0, 10, (40,), generator=g)
    return TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])


def test_fingerprint_follows_the_data():
    a = job.data_fingerprint(*_sets())
    assert a == job.data_fingerprint(*_sets())
    assert a != job.data_fingerprint(*_sets(shift=1e-3))
    train, test = _sets()
    train.tensors[1][7] = (train.tensors[1][7] + 1) % 10  # one label changed
    assert a != job.data_fingerprint(train, test)


def test_cache_path_names_version_and_data():
    cfg = load_config(TINY)
    train, test = _sets()
    path = job.dense_cache_path(cfg, train, test)
    assert job.__version__ in path.name
    assert f"-s{job.STREAMS_VERSION}-" in path.name  # new random streams never reuse old results
    other = job.dense_cache_path(cfg, *_sets(shift=0.5))
    assert other != path


def test_a_cache_entry_without_scores_is_never_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("EDROP_RAY_CACHE", str(tmp_path))
    cfg = load_config(TINY)
    train, test = _sets()
    path = job.dense_cache_path(cfg, train, test)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"top1": "stale"}))
    calls = []
    monkeypatch.setattr(job, "train_dense", lambda learner, t: calls.append(1) or {"top1": 1.0})
    monkeypatch.setattr(job, "Learner", lambda *a, **k: None)
    assert job.dense_baseline(cfg, (train, test, None), torch.device("cpu")) == {"top1": 1.0}
    assert calls == [1]
