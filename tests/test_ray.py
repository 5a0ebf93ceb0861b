"""The Ray backend against the in-process engine on the session's shared local cluster.

Every process pins one torch thread (cpu_threads=1) so that float sums, and so the masks, are
bit-identical across backends on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from edrop_ray import job
from edrop_ray.config import load_config
from edrop_ray.data import load_datasets
from edrop_ray.distributed.runner import RayRuntime, plan_resources
from edrop_ray.learner import Learner
from edrop_ray.loop import run_edropout
from edrop_ray.run import replica_source

pytestmark = pytest.mark.ray
SHARED_RAY = True  # the session's Ray instance (tests/conftest.py: ray_cluster)
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SAME = ["cpu_threads=1", "num_evaluators=2", "trainer_cpus=1"]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    job.prune(load_config(TINY, [*SAME, "backend=local"]), out, quiet=True)
    return out


def mask_of(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "mask.pt", weights_only=True)["mask"]


def test_plan_resources():
    cfg = load_config(TINY)
    assert plan_resources(cfg, {"CPU": 16}) == (2, 0.0, 0.0)
    assert plan_resources(cfg, {"CPU": 1}) == (1, 0.0, 0.0)
    assert plan_resources(cfg, {"CPU": 64, "GPU": 8}) == (7, 1.0, 1.0)  # trainer keeps one
    assert plan_resources(cfg, {"CPU": 8, "GPU": 1}) == (1, 0.5, 0.5)
    fixed = load_config(TINY, ["num_evaluators=3", "gpus_per_evaluator=0.25", "trainer_gpus=0"])
    assert plan_resources(fixed, {"CPU": 8, "GPU": 1}) == (3, 0.25, 0.0)


@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_ray_backend_equals_local_backend(cluster, local_run, tmp_path, transport):
    """Exact fp32 weights by gloo broadcast or by object store: the same mask as in process."""
    out = tmp_path / "ray"
    job.prune(
        load_config(TINY, [*SAME, "backend=ray", f"weights_transport={transport}"]), out, quiet=True
    )
    assert torch.equal(mask_of(out), mask_of(local_run))
    ray_hist = pq.read_table(out / "history.parquet").to_pylist()
    local_hist = pq.read_table(local_run / "history.parquet").to_pylist()
    assert len(ray_hist) == len(local_hist)
    for a, b in zip(ray_hist, local_hist, strict=True):
        assert a["best_energy"] == pytest.approx(b["best_energy"], abs=1e-6)
        assert a["mean_energy"] == pytest.approx(b["mean_energy"], abs=1e-6)
        assert a["evaluators"] == 2
    # the snapshots the driver fetches from the coordinator when due are the local run's
    ray_pop = pq.read_table(out / "population.parquet").to_pylist()
    local_pop = pq.read_table(local_run / "population.parquet").to_pylist()
    assert len({r["generation"] for r in ray_pop}) > 2
    assert [(r["generation"], r["member"], r["bits"]) for r in ray_pop] == [
        (r["generation"], r["member"], r["bits"]) for r in local_pop
    ]
    for a, b in zip(ray_pop, local_pop, strict=True):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-6)
    ra = json.loads((out / "report.json").read_text())
    rb = json.loads((local_run / "report.json").read_text())
    assert ra["backend"] == "ray" and rb["backend"] == "local"
    assert ra["weights_transport"] == (
        "collective (gloo, fp32)" if transport == "collective" else "object_store"
    )
    for key in ("pruned_top1", "params_pruned", "macs_pruned", "generations"):
        assert ra[key] == rb[key]


def _drive(cfg, on_generation, rejoin_s: float = 0.0):
    """Run the Ray runtime directly (as job.py does) with a hook between generations; then,
    with ``rejoin_s``, wait that long at most for evaluators marked dead to rejoin."""
    train_set, _test, info = load_datasets(cfg.dataset, data_root=".", input_size=cfg.input_size)
    local = Learner(cfg, train_set, info, torch.device("cpu"))
    # as a run builds them: the actors from the driver's portable copy of the model
    runtime = RayRuntime(cfg, info, local.units, model=replica_source(local, None))
    try:
        run_edropout(
            runtime.learner,
            runtime.search,
            on_generation=lambda r: on_generation(runtime, r),
        )
        stats = ray.get(runtime.coordinator.stats.remote(), timeout=60)
        stats["timings"] = ray.get(runtime.coordinator.timing_log.remote(), timeout=60)[0]
        if rejoin_s:
            step = runtime.learner.step
            stats["after_rejoin"] = ray.get(
                runtime.coordinator.rejoin.remote(step, rejoin_s), timeout=rejoin_s + 300
            )
        return runtime.search.best.clone(), stats
    finally:
        runtime.shutdown()


def test_killed_evaluator_is_replaced_and_the_mask_is_unchanged(cluster, local_run):
    """Collective transport (gloo): the group is re-formed without the dead rank, the restarted
    evaluator rejoins it, and the run ends with the in-process mask."""
    cfg = load_config(TINY, [*SAME, "backend=ray", "generation_timeout_s=60"])
    killed = []

    def kill_one(runtime, record):
        if record["generation"] == 2:
            pid = runtime.identities()[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    best, stats = _drive(cfg, kill_one, rejoin_s=240)
    assert killed, "the evaluator was never killed"
    # its loss was seen, while the weights went out or while its shard was out (then re-run)
    assert stats["lost_in_sync"] + stats["reruns"] >= 1
    assert stats["regroups"] >= 2  # formed once, re-formed without it
    # in the steady state a generation was judged over the group, one call in all, and its
    # trials were proposed by the evaluators (each its own shard), not by the coordinator
    assert stats["grouped"] >= 1
    by_ranks = [t for t in stats["timings"] if t["proposed_s"]]
    assert len(by_ranks) == stats["grouped"]
    assert all(t["propose_s"] == 0.0 for t in by_ranks)
    assert torch.equal(best, mask_of(local_run))
    after = stats["after_rejoin"]  # the restarted evaluator is back in the group
    assert after["live"] == 2 and after["members"] == [0, 1]
    assert after["regroups"] > stats["regroups"] or stats["members"] == [0, 1]


def test_resume_after_the_driver_is_killed(cluster, local_run, tmp_path):
    out = tmp_path / "stopped"
    env = dict(os.environ, RAY_ADDRESS=cluster, EDROP_RAY_CACHE=os.environ["EDROP_RAY_CACHE"])
    cmd = [sys.executable, "-m", "edrop_ray", "prune", "--config", str(TINY), "--out", str(out),
           "--quiet", *[a for s in SAME for a in ("--set", s)], "--set", "backend=ray"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (out / "report.json").exists(), "the run finished before it could be stopped"
    job.resume(out, quiet=True)
    assert torch.equal(mask_of(out), mask_of(local_run))
    report = json.loads((out / "report.json").read_text())
    local = json.loads((local_run / "report.json").read_text())
    assert report["generations"] == local["generations"]
    assert report["pruned_top1"] == local["pruned_top1"]


def test_nan_in_the_trainer_actor_reaches_the_driver_as_a_user_error(cluster):
    """The CLI turns UserError into one line and exit 2; it must survive the actor boundary."""
    from edrop_ray.errors import UserError

    cfg = load_config(TINY, [*SAME, "backend=ray", "lr=1e30"])
    with pytest.raises(UserError, match="lower the learning rate"):
        _drive(cfg, lambda runtime, record: None)


def test_lost_trainer_stops_with_a_resume_hint_and_resume_finishes_the_run(
    cluster, local_run, tmp_path, monkeypatch
):
    import threading

    from edrop_ray.distributed import runner
    from edrop_ray.errors import UserError

    out = tmp_path / "trainer-lost"
    killed = []
    runtimes = []
    start = runner.RayRuntime.__init__

    def keep(self, *args, **kwargs):  # the runtime job.prune starts, to ask its trainer's pid
        start(self, *args, **kwargs)
        runtimes.append(self)

    monkeypatch.setattr(runner.RayRuntime, "__init__", keep)

    def kill_trainer_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if runtimes:  # only the pid this run's trainer reported, never a name match
            pid = runtimes[0].trainer_identity["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    watcher = threading.Thread(target=kill_trainer_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(UserError, match="edrop-ray resume"):
        job.prune(load_config(TINY, [*SAME, "backend=ray"]), out, quiet=True)
    watcher.join(timeout=60)
    assert killed
    monkeypatch.undo()
    job.resume(out, quiet=True)
    assert torch.equal(mask_of(out), mask_of(local_run))


@pytest.fixture(scope="module")
def local_pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-pipeline") / "run"
    job.prune(load_config(TINY, [*SAME, "backend=local", "pipeline=true"]), out, quiet=True)
    return out


@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_pipeline_ray_backend_equals_local_backend(
    cluster, local_pipeline_run, tmp_path, transport
):
    """pipeline: true on both backends (the trainer's step and the judging overlap on Ray, run in
    turn in process): the same one-step-stale rule, so the same mask and energies."""
    local = local_pipeline_run
    out = tmp_path / "ray"
    sets = [*SAME, "backend=ray", "pipeline=true", f"weights_transport={transport}"]
    job.prune(load_config(TINY, sets), out, quiet=True)
    assert torch.equal(mask_of(out), mask_of(local))
    ray_hist = pq.read_table(out / "history.parquet").to_pylist()
    local_hist = pq.read_table(local / "history.parquet").to_pylist()
    assert len(ray_hist) == len(local_hist)
    for a, b in zip(ray_hist, local_hist, strict=True):
        assert a["best_energy"] == pytest.approx(b["best_energy"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_pool_reruns_the_items_of_a_dead_evaluator_and_keeps_their_order(cluster):
    from edrop_ray.distributed.pool import EvaluatorPool

    class _Echo:  # defined here: Ray ships it by value (workers cannot import the test module)
        def identity(self) -> dict:
            return {"pid": os.getpid()}

        def square(self, item: int) -> tuple[int, int]:
            return item, item * item

    actors = [ray.remote(_Echo).options(num_cpus=0).remote() for _ in range(3)]
    pool = EvaluatorPool(actors, timeout_s=60)
    ray.kill(actors[1], no_restart=True)
    out = pool.map(lambda actor, item: actor.square.remote(item), 3)
    assert out == [(0, 0), (1, 1), (2, 4)]
    assert pool.reruns == 1 and pool.live == [True, False, True]
    assert pool.healthy() == [0, 2]
    failed, error = pool.foreach(lambda i, a: a.identity.remote(), [0, 1, 2])
    assert failed == [1] and error is not None and pool.num_healthy() == 2
    pool.probe()  # killed for good: stays out
    assert pool.live == [True, False, True]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_failure_while_the_actors_start_kills_them(cluster, tmp_path, monkeypatch, failure):
    """The actors are asked for before the dense baseline trains and boot meanwhile; Ctrl-C or
    an error during the dense training still kills every one of them, and the run folder is
    cleaned up as before."""
    from ray.exceptions import RayActorError

    from edrop_ray.distributed import runner
    from edrop_ray.errors import RunInterrupted

    runtimes = []
    start = runner.RayRuntime.__init__

    def keep(self, *args, **kwargs):
        start(self, *args, **kwargs)
        runtimes.append(self)

    def dense_fails(*_args, **_kwargs):
        # every actor was asked for, and none waited for
        assert runtimes and runtimes[0].coordinator is not None and not runtimes[0]._ready
        raise failure("stopped while the dense baseline trained")

    monkeypatch.setattr(runner.RayRuntime, "__init__", keep)
    monkeypatch.setattr(job, "dense_baseline", dense_fails)
    expected = RunInterrupted if failure is KeyboardInterrupt else failure
    with pytest.raises(expected):
        job.prune(load_config(TINY, [*SAME, "backend=ray"]), tmp_path / "run", quiet=True)
    (runtime,) = runtimes
    calls = [e.identity.remote() for e in runtime.evaluators]
    calls += [runtime.trainer.info.remote(), runtime.coordinator.stats.remote()]
    for call in calls:
        with pytest.raises(RayActorError):
            ray.get(call, timeout=60)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("portable", [True, False], ids=["portable-copy", "by-name"])
def test_the_actors_boot_on_the_drivers_units_and_data(cluster, portable):
    """The coordinator holds states, never a model: its process must not import torchvision,
    Torch-Pruning or scikit-learn (seconds of CPU per process; it imports the actors' module to
    unpickle its handles to them). The trainer and the evaluators take the units the driver
    traced, so they never import Torch-Pruning either. A data set the driver holds in memory
    goes to the trainer, which then never reads it again (digits: no scikit-learn). Built from
    the driver's portable copy of the model (as a run builds them), they import no torchvision
    either; built by name, they do."""

    def heavy_modules(_actor) -> list[str]:  # defined here: pickled by value, run in the actor
        import sys

        return sorted(m for m in ("torchvision", "torch_pruning", "sklearn") if m in sys.modules)

    cfg = load_config(TINY, [*SAME, "num_evaluators=1"])
    train_set, _test, info = load_datasets(cfg.dataset, data_root=".", input_size=cfg.input_size)
    local = Learner(cfg, train_set, info, torch.device("cpu"))
    model = replica_source(local, None) if portable else None
    assert portable is (model is not None)
    runtime = RayRuntime(cfg, info, local.units, model=model, train_set=train_set)
    try:
        coordinator, trainer, evaluator = (
            ray.get(a.__ray_call__.remote(heavy_modules), timeout=120)
            for a in (runtime.coordinator, runtime.trainer, runtime.evaluators[0])
        )
        steps = ray.get(runtime.trainer.info.remote(), timeout=60)["total_steps"]
    finally:
        runtime.shutdown()
    assert coordinator == []
    # by name, the actors that hold a model import torchvision (the check can fail)
    assert trainer == evaluator == ([] if portable else ["torchvision"])
    assert steps == local.total_steps
