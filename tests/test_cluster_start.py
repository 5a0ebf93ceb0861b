"""A prune on Ray starts its private instance ahead, on a thread, with preloaded workers.

``edrop-ray prune`` starts Ray while it imports torch and reads the data (``cluster.start_ahead``),
and the instance's workers import torch and the actors' modules before they are asked for an
actor (``cluster.PRELOAD``). The thread that started Ray must outlive the run: Ray's processes
die with it (a parent-death signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edrop_ray import cli, cluster
from edrop_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_AUTH_MODE="disabled")
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture
def stand_in(monkeypatch):
    """start_private_instance replaced by a recorder (no Ray starts); the SIGTERM handler and the
    start ahead are reset after the test."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "start_private_instance", lambda n, **kw: calls.append((n, kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    yield calls
    cluster.stop_ahead()
    signal.signal(signal.SIGTERM, handler)


def _cfg(*overrides):
    return load_config(None, ["backend=ray", *overrides], names=False)


def test_nothing_starts_ahead_for_a_local_run_or_a_cluster(stand_in, monkeypatch):
    assert not cluster.start_ahead(_cfg("backend=local"))
    assert not cluster.start_ahead(_cfg("ray_address=127.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not cluster.start_ahead(_cfg())
    assert stand_in == []


def test_the_run_takes_the_instance_started_ahead(stand_in):
    cfg = _cfg("num_evaluators=3", "cpus_per_evaluator=1", "trainer_cpus=2")
    assert cluster.start_ahead(cfg)
    with pytest.raises(SystemExit):  # Ray's handler (exit, so Ray stops), set on this thread
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    thread = cluster._AHEAD["thread"]
    assert cluster.connect_ray(None, **cluster.prune_instance(cfg)) is True  # started by us
    assert stand_in == [(max(os.cpu_count() or 1, 5), {"workers": 5})]  # one start, 3 + 2
    assert thread.is_alive()  # Ray's processes live as long as the thread that started them
    cluster.stop_ahead()
    assert not thread.is_alive() and "thread" not in cluster._AHEAD


def test_a_failed_start_ahead_fails_the_run_in_the_main_thread(stand_in, monkeypatch):
    def fail(n, **kw):
        raise RuntimeError("no room for Ray")

    monkeypatch.setattr(cluster, "start_private_instance", fail)
    assert cluster.start_ahead(_cfg())
    with pytest.raises(RuntimeError, match="no room for Ray"):
        cluster.connect_ray(None, num_cpus=4, workers=4)


def test_a_ray_no_run_took_is_stopped(stand_in, monkeypatch):
    import ray

    stopped = []
    assert cluster.start_ahead(_cfg())
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(thread.is_alive()))
    thread = cluster._AHEAD["thread"]
    cluster.stop_ahead()
    assert stopped == [True]  # stopped while the thread lived, then the thread ended
    assert not thread.is_alive()


def test_the_command_stops_it_when_the_run_fails_first(stand_in, tmp_path, capsys):
    # an unknown model is refused after the start ahead (its registry imports torchvision)
    out = tmp_path / "run"
    rc = cli.main(["prune", "--backend", "ray", "--set", "model=nosuchnet", "--out", str(out)])
    assert rc == 2 and "nosuchnet" in capsys.readouterr().err
    assert len(stand_in) == 1  # it had started ahead...
    assert "thread" not in cluster._AHEAD  # ...and the command ended it
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name == "edrop-ray-start"]


def test_the_preloaded_modules_leave_cuda_alone():
    # a worker imports them before Ray gives it its GPU; CUDA read then would pin the wrong one
    code = (
        "import torch\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('CUDA touched on import')\n"
        "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device',\n"
        "             'get_device_name', 'get_device_properties', 'set_device'):\n"
        "    setattr(torch.cuda, name, refuse)\n"
        "import importlib\n"
        f"for m in {cluster.PRELOAD!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=ENV)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process start times")
def test_a_real_start_ahead_serves_every_actor_from_a_preloaded_worker():
    # A fresh process, as the command is: Ray started on the thread, then used from the main
    # thread after the thread's ray.init returned. Had the thread ended, Ray's processes would
    # have died with it and the calls below would fail.
    # The actors are asked for in the shapes and order of a prune on the default config: the
    # evaluators' placement group first, then one evaluator per bundle, the trainer (every
    # core) and the coordinator (no CPU). Each must take a worker started before it was asked
    # for: the group leaves fewer CPUs available, and by default Ray then kills the idle
    # workers above that count, those meant for the trainer and the coordinator.
    code = """
import json, os, sys, time
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from edrop_ray import cluster
from edrop_ray.config import load_config

def started():  # this process's start, in clock ticks since boot
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])

cfg = load_config(None, ["backend=ray", "cpus_per_evaluator=1"], names=False)
n = cfg.num_evaluators or 2
assert cluster.start_ahead(cfg)
size = cluster.prune_instance(cfg)
assert cluster.connect_ray(None, **size)
time.sleep(3)  # the workers started with the instance have registered

class Probe:
    def seen(self):
        return sorted(m for m in sys.modules if m.startswith(("torch", "edrop_ray.distributed")))

    def started(self):
        return started()

pg = placement_group([{"CPU": 1}] * n)
ray.get(pg.ready(), timeout=120)
time.sleep(2)  # Ray looks for idle workers to kill several times a second
asked = int(float(open("/proc/uptime").read().split()[0]) * os.sysconf("SC_CLK_TCK"))
actors = [
    ray.remote(Probe).options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote()
    for i in range(n)
]
actors.append(ray.remote(Probe).options(num_cpus=size["num_cpus"] - n).remote())
actors.append(ray.remote(Probe).options(num_cpus=0).remote())
seen = ray.get([a.seen.remote() for a in actors], timeout=120)
starts = ray.get([a.started.remote() for a in actors], timeout=120)
alive = cluster._AHEAD["thread"].is_alive()
cluster.stop_ahead()
print(json.dumps({"seen": seen, "late": [s > asked for s in starts], "workers": size["workers"],
                  "alive": alive, "up": ray.is_initialized()}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["late"]) == out["workers"] == 4
    # every actor's process was there before the actors were asked for
    assert out["late"] == [False] * 4
    # the probe's class imports nothing: what each sees, its worker had imported before
    for seen in out["seen"]:
        for name in cluster.PRELOAD:
            assert name in seen, name
    assert out["alive"] and not out["up"]
    assert "SIGTERM handler is not set" not in proc.stderr  # the thread's warning is dropped


def test_start_ahead_from_a_runs_config_file(stand_in, tmp_path):
    (tmp_path / "config.yaml").write_text("backend: ray\nnum_evaluators: 1\n")
    cli._start_ahead_from(tmp_path / "config.yaml")
    assert len(stand_in) == 1 and stand_in[0][1] == {"workers": 3}
    cluster.stop_ahead()
    (tmp_path / "config.yaml").write_text("backend: [ray\n")  # unreadable: resume says so later
    cli._start_ahead_from(tmp_path / "config.yaml")
    assert len(stand_in) == 1 and "thread" not in cluster._AHEAD


def test_a_prune_killed_and_resumed_on_private_instances(tmp_path):
    # The command as a user runs it, with no cluster: Ray starts ahead in prune, and again in
    # resume (from the run's config.yaml). The driver is killed after its first checkpoint.
    tiny = ROOT / "configs" / "tiny.yaml"
    out = tmp_path / "run"
    sets = ["cpu_threads=1", "num_evaluators=2", "trainer_cpus=1", "backend=ray"]
    cmd = [sys.executable, "-m", "edrop_ray", "prune", "--config", str(tiny), "--out", str(out),
           "--quiet", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the pid this test started
    finally:
        proc.wait(timeout=60)
    assert not (out / "report.json").exists(), "the run finished before it could be stopped"
    resume = [sys.executable, "-m", "edrop_ray", "resume", str(out), "--quiet"]
    done = subprocess.run(resume, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM handler is not set" not in done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ray" and report["params_pruned"] < report["params_dense"]
