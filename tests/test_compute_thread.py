"""One thread computes in each model actor (``devices.ComputeThread``): libgomp keeps an OpenMP
team for every thread that starts parallel work, and with more teams' threads than CPUs it stops
spinning between regions, which slowed the trainer's steps on a small machine. These tests check
the invariants that prevent it; the speed itself is measured in ``benchmarks/``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from edrop_ray.config import load_config
from edrop_ray.devices import ComputeThread

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # this thread's and the process's default


class _Calls(TorchFunctionMode):
    """Records the thread of every torch call made under it."""

    def __init__(self):
        super().__init__()
        self.threads: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.threads.append((getattr(func, "__name__", str(func)), threading.get_ident()))
        return func(*args, **(kwargs or {}))


def _in_thread(fn, *args):
    """``fn(*args)`` on a new thread (as Ray's concurrency groups call an actor); its result,
    or its error raised here."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised in the caller below
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_run_returns_raises_and_runs_in_place_from_its_own_thread():
    compute = ComputeThread(1)
    assert compute.run(threading.get_ident) == compute.ident != threading.get_ident()
    assert compute.run(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
    # a method on the compute thread that calls another: in place, not queued behind itself
    assert compute.run(compute.run, threading.get_ident) == compute.ident
    compute.close()  # the thread ends; nothing more runs there
    with pytest.raises(RuntimeError):
        compute.run(threading.get_ident)


def test_the_compute_thread_keeps_its_threads_and_every_other_thread_gets_one():
    def make():
        compute = ComputeThread(2)
        return compute, torch.get_num_threads()

    compute, maker = _in_thread(make)
    assert compute.run(torch.get_num_threads) == 2
    assert maker == 1  # the thread that made it (an actor's main thread)
    assert _in_thread(torch.get_num_threads) == 1  # a thread started after (a concurrency group)
    # the compute thread keeps its own when another thread changes the default again
    _in_thread(torch.set_num_threads, 1)
    assert compute.run(torch.get_num_threads) == 2


def test_the_callers_torch_modes_apply_on_the_compute_thread():
    compute = ComputeThread(1)
    with _Calls() as calls:
        out = compute.run(torch.add, torch.ones(2), 1)
    assert torch.equal(out, torch.full((2,), 2.0))
    assert ("add", compute.ident) in calls.threads
    calls.threads.clear()
    compute.run(torch.add, torch.ones(2), 1)  # no mode in the caller: none there either
    assert calls.threads == []


def test_the_trainer_computes_only_on_its_compute_thread():
    """Built on one thread, trained on a second, its weights staged for a broadcast from a
    third (as Ray calls an actor with concurrency groups): every torch call of that work runs
    on the trainer's compute thread."""
    from edrop_ray.distributed.actors import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cpu_threads=1"])
    calls = _Calls()
    with calls:
        trainer = _in_thread(Trainer, cfg, 1.0)
    state = torch.ones(trainer.learner.units.num_units, dtype=torch.bool)
    with calls:
        _in_thread(trainer.train, state)
        trainer.energy_batch()
        trainer.weights()
        _in_thread(trainer._stage_for_send, trainer.learner.step)  # the comm thread's staging
        trainer.load_state_dict(trainer.state_dict())
    elsewhere = {name for name, ident in calls.threads if ident != trainer.compute.ident}
    assert len(calls.threads) > 100  # the work was recorded...
    assert elsewhere == set()  # ...all of it there
    assert trainer._staged == -1  # a loaded state drops the staged weights


def test_a_broadcast_waits_for_the_step_that_stages_its_weights():
    """With pipeline, the step t (asked to stage W_t) and the broadcast of W_t are called on
    two threads in either order. When the step is on its way, the broadcast waits for it to
    stage W_t, and neither stages on its own or fails; it does not wait for the step to end."""
    from edrop_ray.distributed.actors import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cpu_threads=1"])
    trainer = Trainer(cfg, 1.0)
    state = torch.ones(trainer.learner.units.num_units, dtype=torch.bool)
    t = trainer.learner.step
    busy, go, stepping = threading.Event(), threading.Event(), threading.Event()
    hold = threading.Thread(target=trainer.compute.run, args=(lambda: (busy.set(), go.wait()),))
    hold.start()  # the compute thread is busy, so the step below queues behind it
    assert busy.wait(60)
    inner = trainer.learner.train

    def slow_step(s):  # a step that does not end before the broadcast has gone on
        stepping.set()
        assert sent.wait(60)
        return inner(s)

    trainer.learner.train = slow_step
    sent = threading.Event()
    losses: list = []
    step = threading.Thread(target=lambda: losses.append(trainer.train(state, stage=t)))
    step.start()
    deadline = time.monotonic() + 60
    while trainer._stage_due != t:  # the step has said it stages W_t
        assert time.monotonic() < deadline
        time.sleep(0.01)
    broadcast = threading.Thread(target=lambda: (trainer._stage_for_send(t), sent.set()))
    broadcast.start()
    go.set()  # the compute thread takes the step: W_t staged, then the (slow) step
    broadcast.join(60)
    step.join(60)
    hold.join(60)
    assert stepping.is_set() and sent.is_set() and len(losses) == 1
    assert trainer._staged == t and trainer.learner.step == t + 1
