"""The weights transport without Ray: the flat buffer, its views, and a real gloo broadcast
between two processes."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from edrop_ray.distributed.transport import FlatWeights, GroupMember, choose_transport
from edrop_ray.energy import compute_energies
from edrop_ray.errors import UserError
from edrop_ray.masking import Masker
from edrop_ray.models import build_model
from edrop_ray.units import discover_units


def randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so a buffer left behind shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _model(seed: int, channels_last: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model("resnet18", num_classes=10, in_channels=1)
    randomise_norms(m, seed)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m.eval()


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_bound_model_tensors_are_views_of_the_buffer_and_take_its_values(channels_last):
    sender, receiver = _model(0, channels_last), _model(1, channels_last)
    out = FlatWeights(sender, device=torch.device("cpu"), dtype=torch.float32)
    into = FlatWeights(receiver, device=torch.device("cpu"), dtype=torch.float32)
    into.bind(receiver)
    out.pack()
    into.flat.copy_(out.flat)  # what the broadcast does
    start = into.flat.data_ptr()
    end = start + into.nbytes
    for name, t in _floats(receiver).items():
        assert start <= t.data_ptr() < end, f"{name} is not a view of the buffer"
        assert torch.equal(t, _floats(sender)[name]), name
        if channels_last and t.dim() == 4:
            assert t.is_contiguous(memory_format=torch.channels_last)
    assert into.nbytes == sum(t.numel() * 4 for t in _floats(sender).values())


def test_bf16_wire_rounds_the_weights_and_moves_energies_only_slightly():
    sender, receiver = _model(0), _model(1)
    wire = FlatWeights(sender, device=torch.device("cpu"), dtype=torch.bfloat16)
    into = FlatWeights(receiver, device=torch.device("cpu"), dtype=torch.float32)
    into.bind(receiver)
    wire.pack()
    into.flat.copy_(wire.flat)
    for name, t in _floats(receiver).items():
        assert torch.equal(t, _floats(sender)[name].bfloat16().float()), name
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 10
    units = discover_units(sender, x[:2])
    states = torch.rand(6, units.num_units, generator=torch.Generator().manual_seed(3)) < 0.7
    e32 = compute_energies(sender, Masker(sender, units), states, x, y)
    e16 = compute_energies(receiver, Masker(receiver, units), states, x, y)
    assert not torch.equal(e32, e16)  # bf16 is not exact...
    assert torch.allclose(e32, e16, rtol=0.05, atol=0.05)  # ...but close


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver(port: int, wire: str, queue) -> None:
    torch.set_num_threads(1)
    model = _model(1)
    member = GroupMember(model, torch.device("cpu"), wire, bind=True)
    member.join(("127.0.0.1", port), 1, 2, "gloo", 60.0, epoch=0)
    for version in (3, 4):
        member.receive(version, 0)
        # numpy, not tensors: a tensor would go through shared memory that dies with this process
        queue.put((version, {k: v.numpy().copy() for k, v in _floats(model).items()}))
    member.leave()


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_gloo_broadcast_gives_the_receiver_the_senders_weights(wire):
    port = _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_receiver, args=(port, wire, queue), daemon=True)
    child.start()
    sender = _model(0)
    member = GroupMember(sender, torch.device("cpu"), wire, bind=False)
    try:
        member.join(("127.0.0.1", port), 0, 2, "gloo", 60.0, epoch=0)
        sent = member.publish(3, 0, pack=True)
        version, got = queue.get(timeout=120)
        cast = (lambda t: t.bfloat16().float()) if wire == "bf16" else (lambda t: t)
        assert version == 3
        for name, t in _floats(sender).items():
            assert torch.equal(torch.from_numpy(got[name]), cast(t)), name
        # the next version: new values, same buffer
        with torch.no_grad():
            for p in sender.parameters():
                p.add_(1.0)
        member.publish(4, 0, pack=True)
        version, got = queue.get(timeout=120)
        assert version == 4
        for name, t in _floats(sender).items():
            assert torch.equal(torch.from_numpy(got[name]), cast(t)), name
        assert sent["bytes"] == member.nbytes
        assert member.nbytes == sum(t.numel() for t in _floats(sender).values()) * (
            4 if wire == "fp32" else 2
        )
    finally:
        member.leave()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_a_missing_rank_makes_joining_fail_instead_of_hanging():
    member = GroupMember(_model(0), torch.device("cpu"), "fp32", bind=False)
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        member.join(("127.0.0.1", _free_port()), 0, 2, "gloo", 2.0, epoch=0)
    member.leave()


def test_wrong_epoch_is_refused_before_any_collective():
    member = GroupMember(_model(0), torch.device("cpu"), "fp32", bind=False)
    with pytest.raises(RuntimeError, match="not in group"):
        member.publish(0, 5, pack=True)


def _rank(device: str, node: str = "n", gpus: tuple[str, ...] = ()) -> dict:
    return {"pid": 1, "node_id": node, "device": device, "gpu_ids": list(gpus)}


def test_choose_transport():
    cpu = [_rank("cpu")] * 3
    assert choose_transport("auto", cpu)[:2] == ("collective", "gloo")
    assert choose_transport("object_store", cpu)[:2] == ("object_store", "")
    own = [_rank("cuda", "a", ("0",)), _rank("cuda", "a", ("1",)), _rank("cuda", "b", ("0",))]
    assert choose_transport("auto", own)[:2] == ("collective", "nccl")
    shared = [_rank("cuda", "a", ("0",)), _rank("cuda", "a", ("0",))]
    assert choose_transport("auto", shared)[:2] == ("object_store", "")
    with pytest.raises(UserError, match="share a GPU"):
        choose_transport("collective", shared)
    mixed = [_rank("cpu"), _rank("cuda", "a", ("0",))]
    assert choose_transport("auto", mixed)[0] == "object_store"


def test_the_trainer_stages_the_weights_a_step_moves_past():
    """With pipeline the trainer's step t may run while weights t are broadcast: the step
    stages W_t in the send buffer first, a publish of t then sends exactly W_t, and no version
    can be staged from weights that are not that step's (or mid-step)."""
    from pathlib import Path

    from edrop_ray.config import load_config
    from edrop_ray.distributed.actors import Trainer

    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["cpu_threads=1"])
    trainer = Trainer(cfg, 1.0)
    state = torch.ones(trainer.learner.units.num_units, dtype=torch.bool)
    trainer.train(state)  # step 0 -> 1, nothing staged
    before = FlatWeights(trainer.learner.model, device=torch.device("cpu"), dtype=torch.float32)
    before.pack()  # W_1
    trainer.train(state, stage=1)  # stages W_1, then steps to 2
    staged = trainer.member.home.flat.clone()
    assert torch.equal(staged, before.flat)
    after = FlatWeights(trainer.learner.model, device=torch.device("cpu"), dtype=torch.float32)
    after.pack()
    assert not torch.equal(after.flat, before.flat)  # the step changed the model, not the buffer
    trainer._stage(1)  # staged already: a re-formed group gets W_1 again, untouched
    assert torch.equal(trainer.member.home.flat, staged)
    with pytest.raises(RuntimeError, match="weights 3 asked for at step 2"):
        trainer._stage(3)
    trainer._stepping = True  # a step under way: its weights cannot be staged
    with pytest.raises(RuntimeError, match="weights 2 asked for"):
        trainer._stage(2)
    trainer._stepping = False
    trainer._stage(2)
    assert torch.equal(trainer.member.home.flat, after.flat)
