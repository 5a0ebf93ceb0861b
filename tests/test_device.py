"""Device and precision: every path runs with the model on a device other than the states' CPU.

No GPU is needed. ``device_guard.other_device()`` gives a second device that computes on the CPU
underneath but refuses any operation mixing it with a CPU tensor, as CUDA does. The pruning
states come from :class:`Search` on the CPU, exactly as in a run; the model and the batches live on
the other device. On a device mix-up these tests raise; otherwise the other device computes what
the CPU computes, bit for bit (the same CPU kernels run underneath).

bf16 autocast and channels-last run on the real CPU, where torch supports both.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from device_guard import DeviceMixError, other_device
from torch.utils._pytree import tree_flatten

from edrop_ray import learner as learner_module
from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.energy import compute_energies
from edrop_ray.files import pack_states
from edrop_ray.learner import Learner
from edrop_ray.loop import measure_pruned, run_edropout
from edrop_ray.masking import Masker
from edrop_ray.models import build_model
from edrop_ray.search import Search
from edrop_ray.slim import slim_model
from edrop_ray.train import evaluate
from edrop_ray.units import discover_units

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny(*overrides: str):
    # cpu_threads=1: the two learners compared below must sum floats in the same order
    return load_config(ROOT / "configs" / "tiny.yaml", ("cpu_threads=1", *overrides))


@pytest.fixture(scope="module")
def data():
    return load_for(tiny())


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_guard_refuses_a_device_mix():
    with other_device() as dev:
        x = torch.ones(2, 3, device=dev)
        with pytest.raises(DeviceMixError):
            x * torch.ones(2, 3)
        with pytest.raises(DeviceMixError):
            torch.nn.Linear(3, 2)(x)  # CPU weights, batch on the device
        assert (x * torch.tensor(2.0)).device == dev  # a CPU scalar is fine, as on CUDA
        assert x.cpu().device == CPU and float(x.sum()) == 6.0


def test_masker_puts_cpu_states_on_the_activation_device():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    units = discover_units(model, x)
    states = torch.rand(2, units.num_units, generator=torch.Generator().manual_seed(2)) < 0.5
    masker = Masker(model, units)
    with torch.no_grad(), masker.applied(states):
        want = model(x.repeat(2, 1, 1, 1))
    with other_device() as dev:
        model.to(dev)
        with torch.no_grad(), masker.applied(states):  # states stay on the CPU
            got = model(x.to(dev).repeat(2, 1, 1, 1))
        with torch.no_grad(), masker.applied(states[0].to(dev)):  # states on the device: fine too
            model(x.to(dev))
        assert got.device == dev
        got = got.cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _one_of_each(learner: Learner, search: Search, test_set) -> dict:
    """A generation (batched energies), a masked training step, a masked evaluation and the
    end-of-run measure, the way the loop, compare and Tune trials call them."""
    record = search.run_generation(learner)
    loss = learner.train(search.best)
    # a checkpoint is all CPU (it crosses to a driver that may have no GPU), and resumes
    sd = learner.state_dict()
    tensors = [t for t in tree_flatten(sd)[0] if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device == CPU for t in tensors)
    learner.load_state_dict(sd)
    loss_after_resume = learner.train(search.best)
    scores = learner.evaluate(test_set, search.best)
    slim, measured = measure_pruned(learner, test_set, search.best)
    x = torch.randn(4, learner.info.in_channels, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        slim_logits = slim.eval()(x)
    # `edrop-ray evaluate` and compare's fine-tuned baselines: a slimmed model on the device
    slim_scores = evaluate(
        slim.to(learner.device), learner_module.test_batches(test_set, 256), device=learner.device
    )
    return {
        "energies": search.population.energies.clone(),
        "best_energy": record["best_energy"],
        "loss": loss,
        "loss_after_resume": loss_after_resume,
        "scores": scores,
        "measured": measured,
        "slim_logits": slim_logits,
        "slim_scores": slim_scores,
    }


def test_learner_and_search_on_another_device_compute_what_the_cpu_computes(data):
    train_set, test_set, info = data
    cfg = tiny()
    cpu = Learner(cfg, train_set, info, CPU)
    want = _one_of_each(cpu, Search.from_config(cfg, cpu.units.num_units), test_set)
    with other_device() as dev:
        learner = Learner(cfg, train_set, info, dev)
        assert next(learner.model.parameters()).device == dev
        search = Search.from_config(cfg, learner.units.num_units)
        assert search.best.device == CPU  # the states come from the CPU, as in every run
        got = _one_of_each(learner, search, test_set)
    torch.testing.assert_close(got["energies"], want["energies"], rtol=0, atol=0)
    assert got["loss"] == want["loss"]
    assert got["loss_after_resume"] == want["loss_after_resume"]
    assert got["scores"] == want["scores"]
    assert got["measured"] == want["measured"]
    assert got["slim_scores"] == want["slim_scores"]
    assert got["slim_scores"]["top1"] == want["measured"]["top1"]  # slimmed = masked
    torch.testing.assert_close(got["slim_logits"], want["slim_logits"], rtol=0, atol=0)


def test_a_users_own_model_on_another_device_computes_what_the_cpu_computes(data):
    """edrop_ray.prune()'s path: Learner(model=...) traces a user's module on the CPU and moves
    it to the device; cosine schedule, held-out energy batches and warm-up ride along."""
    train_set, test_set, info = data
    cfg = tiny("lr_schedule=cosine", "energy_source=heldout", "warmup_steps=2")
    example = train_set[0][0].unsqueeze(0)

    def own(device: torch.device):
        torch.manual_seed(3)  # the user's weights, the same for both learners
        model = build_model("resnet18", num_classes=info.num_classes, in_channels=1)
        learner = Learner(cfg, train_set, info, device, model=model, example_inputs=example)
        return _one_of_each(learner, Search.from_config(cfg, learner.units.num_units), test_set)

    want = own(CPU)
    with other_device() as dev:
        got = own(dev)
    torch.testing.assert_close(got["energies"], want["energies"], rtol=0, atol=0)
    assert got["loss"] == want["loss"]
    assert got["measured"] == want["measured"]


def test_the_whole_loop_on_another_device_ends_with_the_cpu_mask(data):
    train_set, _test, info = data
    cfg = tiny("epochs=1", "max_generations=3")

    def run(device: torch.device) -> tuple[torch.Tensor, int]:
        learner = Learner(cfg, train_set, info, device)
        learner.total_steps = 8  # enough for generations and frozen-mask training steps
        search = Search.from_config(cfg, learner.units.num_units)
        run_edropout(learner, search)
        return search.best.clone(), search.generation

    want = run(CPU)
    with other_device() as dev:
        got = run(dev)
    assert got[1] == want[1] == 3
    assert torch.equal(got[0], want[0])


def test_probes_on_another_device_match_the_cpu(data):
    """probe_members: CPU probe states judged by a model on another device, as on the CPU."""
    train_set, _test, info = data
    cfg = tiny("epochs=1", "max_generations=2", "probe_members=2")

    def run(device: torch.device) -> list[float]:
        learner = Learner(cfg, train_set, info, device)
        learner.total_steps = 4
        search = Search.from_config(cfg, learner.units.num_units)
        history: list[dict] = []
        run_edropout(learner, search, on_generation=history.append)
        return [r["probe_energy"] for r in history]

    want = run(CPU)
    with other_device() as dev:
        got = run(dev)
    assert len(want) == 2 and got == pytest.approx(want, rel=1e-4)


def test_bn_recalibration_on_another_device_matches_the_cpu(data):
    """bn_recalibrate with CPU states and the model on another device: same statistics."""
    train_set, _test, info = data
    cfg = tiny()
    state = torch.rand(Learner(cfg, train_set, info, CPU).units.num_units) < 0.5

    def stats(device: torch.device) -> dict[str, torch.Tensor]:
        learner = Learner(cfg, train_set, info, device)
        learner.recalibrate_bn(state, 2)
        return {k: v.cpu() for k, v in learner.model.state_dict().items() if "running" in k}

    want = stats(CPU)
    with other_device() as dev:
        got = stats(dev)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("portable", [True, False], ids=["portable-copy", "by-name"])
def test_the_actors_code_runs_on_another_device(data, monkeypatch, portable):
    """The trainer and evaluator actors' own methods, called in process (no Ray cluster), built
    as the runtime builds them: on the units the driver traced (CPU tensors, pickled), and from
    the driver's portable copy (the trainer with its CPU weights, each evaluator its skeleton,
    CPU zeros until the weights arrive) or by name."""
    from edrop_ray.distributed import actors
    from edrop_ray.run import replica_source

    train_set, _test, info = data
    cfg = tiny()
    local = Learner(cfg, train_set, info, CPU)
    units = pickle.loads(pickle.dumps(local.units))
    model = replica_source(local, None) if portable else None
    assert portable is (model is not None)
    bare = None if model is None else pickle.loads(pickle.dumps(model.without_weights()))
    states = Search.from_config(cfg, units.num_units).propose()
    with other_device() as dev:
        monkeypatch.setattr(actors, "worker_device", lambda _name: dev)
        trainer = actors.Trainer(cfg, 1.0, model, units=units)
        evaluator = actors.Evaluator(cfg, info, 0, bare, units=units)
        assert trainer.learner.device == dev and evaluator.device == dev
        batch = trainer.energy_batch()  # CPU tensors, as shipped through the object store
        assert batch[0].device == CPU
        weights = trainer.weights()  # one flat CPU array, as shipped through the object store
        assert weights.ndim == 1 and weights.dtype == np.float32
        evaluator.load_weights(weights)
        packed = pack_states(states)  # states travel bit-packed
        shard, energies, *_seconds = evaluator.evaluate(3, packed, batch, [None], evaluator.version)
        want = trainer.learner.energies(states, *trainer.learner.to_device(*batch))
        # a pipelined step stages its weights for the broadcast first: on the model's device
        loss = trainer.train(states[0], stage=trainer.learner.step)
        assert trainer.member.home.flat.device == dev
        # the state crosses Ray as numpy arrays (checkpoints, the final weights, a resume),
        # and loads back onto the model's device
        sd = pickle.loads(pickle.dumps(trainer.state_dict(), protocol=5))
        assert not any(isinstance(t, torch.Tensor) for t in tree_flatten(sd)[0])
        want_sd = trainer.learner.state_dict()
        assert trainer.load_state_dict(sd) == trainer.learner.step == 1
        got_sd = trainer.learner.state_dict()
        assert trainer.learner.model.conv1.weight.device == dev
    assert shard == 3 and energies.device == CPU
    torch.testing.assert_close(energies, want, rtol=0, atol=0)
    assert loss == loss  # not NaN
    for w, g in zip(tree_flatten(want_sd)[0], tree_flatten(got_sd)[0], strict=True):
        assert torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g


# ------------------------------------------------------------------ bf16 autocast, channels_last


def _probe_mask_points(model, units, seen: dict):
    modules = dict(model.named_modules())
    # registered after the masker's hooks: they see what flows on from the mask point
    return [
        modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
        for n in units.mask_points
    ]


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_and_channels_last_keep_the_invariants(data, channels_last):
    train_set, test_set, info = data
    cfg = tiny("amp=bf16", f"channels_last={str(channels_last).lower()}")
    learner = Learner(cfg, train_set, info, CPU)
    search = Search.from_config(cfg, learner.units.num_units)
    # energies under bf16 autocast: finite, and batched equals one pass per state
    x, y = learner.energy_batch()
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
    states = search.propose()
    batched = learner.energies(states, x, y)
    looped = compute_energies(
        learner.model, learner.masker, states, x, y, states_per_pass=1, amp="bf16"
    )
    assert torch.isfinite(batched).all() and batched.dtype == torch.float32
    torch.testing.assert_close(batched, looped, rtol=2e-2, atol=2e-2)
    search.select(batched)
    state = search.best

    # a masked training step under autocast: switched-off channels are exactly zero
    seen: dict = {}
    probes = _probe_mask_points(learner.model, learner.units, seen)
    try:
        loss = learner.train(state)
    finally:
        for p in probes:
            p.remove()
    assert loss == loss and abs(loss) < 1e3
    for layer, unit_of in learner.units.mask_points.items():
        off = ~state[unit_of]
        assert torch.count_nonzero(seen[layer][:, off]) == 0, f"{layer} leaks under bf16"
    assert seen and any(o.dtype == torch.bfloat16 for o in seen.values())

    # evaluation with channels_last inputs, and the masked model vs the slimmed one under bf16
    scores = learner.evaluate(test_set, state)
    assert 0.0 <= scores["top1"] <= 100.0 and scores["loss"] == scores["loss"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xb = x.contiguous(memory_format=fmt)
    learner.model.eval()
    slim = slim_model(learner.model, learner.units, state, learner.example).eval()
    slim = slim.to(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with learner.masker.applied(state):
            masked = learner.model(xb).float()
        slimmed = slim(xb).float()
    with torch.no_grad():
        with learner.masker.applied(state):
            exact = learner.model(xb.float())
    scale = float(exact.abs().max())
    # bf16 keeps 8 bits of mantissa: both sides round differently, within a few percent
    torch.testing.assert_close(slimmed, masked, rtol=0, atol=0.05 * scale + 1e-2)
    torch.testing.assert_close(masked, exact, rtol=0, atol=0.05 * scale + 1e-2)


# The element types NCCL reduces and moves (ncclDataType_t as torch maps it): no bool.
_NCCL_DTYPES = {torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.float32,
                torch.float64, torch.bfloat16}  # fmt: skip


class _DeviceWire:
    """``torch.distributed`` as NCCL sees it, in one process: ranks are threads, and every
    tensor handed to a send, receive or broadcast must live on the rank's device (NCCL takes
    only CUDA tensors), be dense and contiguous, and be of an element type NCCL has, else
    AssertionError."""

    def __init__(self, world: int, device: torch.device):
        import queue
        import threading

        self.world, self.device = world, device
        self.local = threading.local()
        self.boxes: dict = {}
        self._lock = threading.Lock()
        self._queue = queue.Queue

    def _box(self, key):
        with self._lock:
            return self.boxes.setdefault(key, self._queue())

    def _on_device(self, t: torch.Tensor, op: str) -> None:
        assert t.device == self.device, f"{op} of a {t.device} tensor; the rank is on {self.device}"
        assert t.dtype in _NCCL_DTYPES, f"{op} of a {t.dtype} tensor: NCCL has no such type"
        assert t.layout == torch.strided and t.is_contiguous(), f"{op} of a non-contiguous tensor"

    class _Done:
        def wait(self, timeout=None):
            return True

    def get_rank(self) -> int:
        return self.local.rank

    def get_world_size(self) -> int:
        return self.world

    def is_initialized(self) -> bool:
        return True

    def isend(self, t, dst):
        self._on_device(t, "send")
        self._box((self.get_rank(), dst)).put(t.clone())
        return self._Done()

    def irecv(self, t, src):
        self._on_device(t, "recv")
        t.copy_(self._box((src, self.get_rank())).get(timeout=20))
        return self._Done()

    def send(self, t, dst):
        self.isend(t, dst)

    def recv(self, t, src):
        self.irecv(t, src)

    def broadcast(self, t, src):
        self._on_device(t, "broadcast")
        if self.get_rank() == src:
            for r in range(self.world):
                if r != src:
                    self._box(("bcast", r)).put(t.clone())
        else:
            t.copy_(self._box(("bcast", self.get_rank())).get(timeout=20))

    def gather(self, t, gather_list=None, dst=0):
        self._on_device(t, "gather")
        if self.get_rank() != dst:
            self._box(("gather", self.get_rank())).put(t.clone())
            return
        for r, out in enumerate(gather_list):
            self._on_device(out, "gather")
            assert out.shape == t.shape, "gather: NCCL needs every rank's tensor the same size"
            out.copy_(t if r == dst else self._box(("gather", r)).get(timeout=20))


def test_the_group_exchange_keeps_every_wire_tensor_on_the_ranks_device(data, monkeypatch):
    """Trainer.judge and Evaluator.serve, as on NCCL ranks: what they send, receive and
    broadcast lives on the model's device, never the CPU states' or batch's, and the energies
    are the ones the evaluator computes in process."""
    import threading

    from edrop_ray.distributed import actors, transport
    from edrop_ray.files import pack_rows

    train_set, _test, info = data
    cfg = tiny()
    units = pickle.loads(pickle.dumps(Learner(cfg, train_set, info, CPU).units))  # the driver's
    search = Search.from_config(cfg, units.num_units)
    members = search.population.states
    trials = search.propose()[members.shape[0] :]  # what the ranks must propose
    with other_device() as dev:
        wire = _DeviceWire(3, dev)
        monkeypatch.setattr(transport, "dist", wire)
        monkeypatch.setattr(actors, "worker_device", lambda _name: dev)
        trainer = actors.Trainer(cfg, 1.0, units=units)
        evaluators = [actors.Evaluator(cfg, info, i, units=units) for i in range(2)]
        for rank, who in enumerate([trainer, *evaluators]):
            member = transport.GroupMember(who.learner.model if rank == 0 else who.model, dev,
                                           "fp32", bind=rank > 0)  # fmt: skip
            member.epoch = 0
            who.member = member
        ended = [None, None]

        def serve(k):  # the stand-in's rank is per thread: the evaluator's compute thread
            evaluators[k].compute.run(setattr, wire.local, "rank", k + 1)
            with other_device():  # the device's guard is per thread (carried to compute's)
                ended[k] = evaluators[k].serve(0, search.proposer)

        threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        wire.local.rank = 0
        x, y = trainer.energy_batch()  # kept by the trainer (outside Ray, under no task id)
        ref = type("Ref", (), {"task_id": lambda self: type("T", (), {"hex": lambda s: None})()})
        out = trainer.judge(trainer.learner.step, 0, pack_rows(members), 0, [ref()])
        assert trainer.member.stop(0, [1, 2]) == [1, 2]
        for th in threads:
            th.join(timeout=120)
        # each rank judges its members, then their trials; the answer: members, then trials
        parts = [
            ev._judge(torch.cat([m, t]), x.to(dev), y.to(dev)).tensor_split(2)
            for ev, m, t in zip(evaluators, members.tensor_split(2), trials.tensor_split(2),
                                strict=True)
        ]  # fmt: skip
        want = torch.cat([p[0] for p in parts] + [p[1] for p in parts])
    assert torch.equal(torch.from_numpy(out["trials"]), torch.from_numpy(pack_rows(trials)))
    assert [e["ended"] for e in ended] == ["stopped", "stopped"]
    assert [e["served"] for e in ended] == [1, 1]
    assert out["sync"] is not None  # the weights went out, from the model's device
    torch.testing.assert_close(out["energies"], want.cpu(), rtol=0, atol=0)
