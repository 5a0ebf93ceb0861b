"""A resumed run ends exactly where an unbroken one does, also with dropout in the model.

SqueezeNet's classifier has ``nn.Dropout``, which draws from torch's global generator. The run is
stopped right after its first checkpoint (as a killed driver would be) and resumed in a process
whose global generator is elsewhere; the final weights must still be bit-identical.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from edrop_ray import job, store
from edrop_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SHARED_RAY = True  # the Ray test runs on the session's instance (conftest.ray_cluster)
SQUEEZE = ["model=squeezenet1_1", "cpu_threads=1", "num_evaluators=1", "trainer_cpus=1"]


class Stopped(Exception):
    """Stands in for the driver being killed right after a checkpoint was written."""


def _stop_after_first_checkpoint(monkeypatch) -> None:
    real = store.save_checkpoint

    def save_then_stop(run_dir, blob):
        real(run_dir, blob)
        raise Stopped

    monkeypatch.setattr(store, "save_checkpoint", save_then_stop)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(run_dir / "pruned_model.pt", weights_only=True)
    return blob["state_dict"] if "state_dict" in blob else blob


def _assert_same_run(a: Path, b: Path) -> None:
    mask_a = torch.load(a / "mask.pt", weights_only=True)["mask"]
    mask_b = torch.load(b / "mask.pt", weights_only=True)["mask"]
    assert torch.equal(mask_a, mask_b)
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if torch.is_tensor(wa[k]) and not torch.equal(wa[k], wb[k])]
    assert not differing, f"resumed weights differ from the unbroken run's: {differing[:5]}"


def _resume_matches_unbroken(backend: str, tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(TINY, [*SQUEEZE, f"backend={backend}"])
    unbroken = tmp_path / "unbroken"
    job.prune(cfg, unbroken, quiet=True)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _stop_after_first_checkpoint(m)
        with pytest.raises(Stopped):
            job.prune(cfg, stopped, quiet=True)
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "report.json").exists()
    # Whatever ran in between moved the global generator: the resumed run must not depend on it.
    torch.manual_seed(12345)
    torch.rand(1000)
    job.resume(stopped, quiet=True)
    _assert_same_run(unbroken, stopped)


def test_squeezenet_resume_is_exact_in_process(tmp_path, monkeypatch):
    _resume_matches_unbroken("local", tmp_path, monkeypatch)


def test_learner_dropout_stream_is_saved_and_restored():
    """The learner's own stream survives a state_dict round trip and leaves the global one be."""
    from edrop_ray.data import load_for
    from edrop_ray.learner import Learner

    cfg = load_config(TINY, SQUEEZE)
    train_set, _test, info = load_for(cfg)
    a = Learner(cfg, train_set, info, torch.device("cpu"))
    a.train(None)
    sd = copy.deepcopy(a.state_dict())  # state_dict shares the live CPU tensors
    a.train(None)
    after_two = {k: v.clone() for k, v in a.model.state_dict().items()}

    b = Learner(cfg, train_set, info, torch.device("cpu"))
    b.load_state_dict(sd)
    before = torch.get_rng_state()
    b.train(None)
    assert torch.equal(torch.get_rng_state(), before), "training moved the global generator"
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, after_two[k]), k


@pytest.mark.ray
def test_squeezenet_resume_is_exact_on_ray(ray_cluster, tmp_path, monkeypatch):
    _resume_matches_unbroken("ray", tmp_path, monkeypatch)  # on the session's Ray instance
