"""Stopping the Ray runtime: the actors go at once, a Ray the run started stops while the driver
measures the pruned model, and nothing returns before that Ray has stopped.

No Ray is started here: ``ray.shutdown`` and the runtime are stand-ins that record the order."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import ray
import torch

from edrop_ray import job
from edrop_ray import run as run_module
from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.distributed.runner import RayRuntime
from edrop_ray.run import RunSpec, execute
from edrop_ray.search import Search

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
SMALL = ["model=squeezenet1_1", "input_size=8", "cpu_threads=1", "backend=ray"]


def _bare_runtime() -> RayRuntime:
    """A runtime that started its own Ray and whose actors are already gone."""
    runtime = RayRuntime.__new__(RayRuntime)
    runtime.evaluators, runtime.trainer, runtime.coordinator, runtime.pg = [], None, None, None
    runtime.started_ray, runtime._stopped, runtime._stopping = True, False, None
    return runtime


def test_release_stops_ray_in_the_background_and_shutdown_waits_for_it(monkeypatch):
    gate, stopped = threading.Event(), []

    def slow_shutdown():  # Ray waiting for its processes to exit
        assert gate.wait(timeout=30)
        stopped.append(threading.current_thread().name)

    monkeypatch.setattr(ray, "shutdown", slow_shutdown)
    runtime = _bare_runtime()
    runtime.release()
    assert stopped == [], "release must not wait for Ray to stop"
    runtime.release()  # a second call neither waits nor starts a second stop
    gate.set()
    runtime.shutdown()
    assert stopped == ["ray-shutdown"]  # once, and done when shutdown returns
    runtime.shutdown()
    assert stopped == ["ray-shutdown"]


class _FakeRuntime:
    """What execute needs of a RayRuntime, backed by the in-process learner; records calls."""

    def __init__(self, cfg, local, counter, calls, fail: bool):
        self.calls, self.fail = calls, fail
        self.learner = local
        local.to_local = lambda _local: local  # the trainer's weights, here already local
        self.search = Search.from_config(cfg, local.units.num_units, counter=counter)
        self.timings, self.transport_line, self.transport_name = {}, "", "fake"

    def wait_ready(self):
        if self.fail:
            raise RuntimeError("an actor failed to start")

    def guard(self, _run_dir):
        return contextlib.nullcontext()

    def release(self):
        self.calls.append("release")

    def shutdown(self):
        self.calls.append("shutdown")


@pytest.mark.parametrize("fail", [False, True], ids=["finishes", "fails"])
def test_execute_measures_while_ray_stops_and_returns_after(monkeypatch, tmp_path, fail):
    cfg = load_config(TINY, SMALL)
    calls: list[str] = []
    monkeypatch.setattr(
        run_module,
        "_start_runtime",
        lambda cfg, local, own, counter: _FakeRuntime(cfg, local, counter, calls, fail),
    )
    finish = job.finish_run

    def recorded_finish(*args, **kwargs):
        calls.append("finish")
        return finish(*args, **kwargs)

    monkeypatch.setattr(job, "finish_run", recorded_finish)
    spec = RunSpec(cfg, load_for(cfg), torch.device("cpu"), tmp_path, quiet=True)
    spec.dense = False
    if fail:
        with pytest.raises(RuntimeError, match="failed to start"):
            execute(spec)
        assert calls == ["shutdown"]  # an error waits for Ray to stop before it propagates
        return
    outcome = execute(spec)
    assert calls == ["release", "finish", "shutdown"]
    assert "ray_stop_wait_s" in outcome.report["timings"]
