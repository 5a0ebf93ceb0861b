"""State dicts across Ray as numpy arrays (edrop_ray/distributed/wire.py): bit for bit, buffers out
of band, and tensors that own their memory on arrival."""

import pickle
from collections import OrderedDict, namedtuple

import numpy as np
import torch
from torch import nn

from edrop_ray.distributed.wire import Packed, pack, unpack


def _trained_state() -> dict:
    """A state like a learner's: a model's tensors, SGD momentum after a step, rng bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "rng": {"cpu": torch.get_rng_state()},
        "mixed": [torch.arange(5, dtype=torch.int16), (torch.ones(2, dtype=torch.bool), 1.5)],
    }


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def _through_ray_pickle(obj):
    """Pickle as Ray does (protocol 5, buffers out of band): (copy, out-of-band buffers)."""
    buffers: list = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[b.raw() for b in buffers]), buffers


def test_a_state_comes_back_bit_for_bit_with_its_structure():
    sd = _trained_state()
    back = unpack(_through_ray_pickle(pack(sd))[0])
    assert type(back["model"]) is OrderedDict and back["model"]._metadata == sd["model"]._metadata
    assert back["step"] == 7 and back["mixed"][1][1] == 1.5
    assert type(back["mixed"][1]) is tuple
    want, got = _leaves(sd), _leaves(back)
    assert len(want) == len(got) and sum(isinstance(x, torch.Tensor) for x in got) > 10
    for w, g in zip(want, got, strict=True):
        assert type(w) is type(g) or isinstance(w, torch.Tensor)
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_every_tensor_travels_as_an_out_of_band_buffer():
    sd = _trained_state()
    packed = pack(sd)
    assert not any(isinstance(x, torch.Tensor) for x in _leaves(packed))
    _copy, buffers = _through_ray_pickle(packed)
    big = [x for x in _leaves(sd) if isinstance(x, torch.Tensor) and x.numel() > 0]
    # numpy hands pickle 5 its data as a buffer (no copy in the pickle stream)
    assert len(buffers) == len(big)
    # as torch pickles them, the same tensors go in band
    _copy, torch_buffers = _through_ray_pickle(sd)
    assert torch_buffers == []


def test_what_numpy_cannot_hold_is_left_as_a_tensor():
    bf16 = torch.randn(3).to(torch.bfloat16)
    meta = torch.empty(2, device="meta")
    packed = pack({"bf16": bf16, "meta": meta, "f32": torch.ones(2)})
    assert packed["bf16"] is bf16 and packed["meta"] is meta
    assert isinstance(packed["f32"], Packed)
    back = unpack(_through_ray_pickle(packed)[0])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], bf16)


def test_a_tensor_met_twice_comes_back_as_one_tensor_that_owns_writable_memory():
    shared = torch.arange(6.0)
    back = unpack(_through_ray_pickle(pack({"a": shared, "b": [shared]}))[0])
    assert back["a"] is back["b"][0]
    # arrays read from Ray's object store are read-only: what unpack returns is a copy
    readonly = np.arange(4.0)
    readonly.setflags(write=False)
    t = unpack(Packed(readonly))
    t += 1  # an optimiser writes into the state it loads
    assert t.tolist() == [1.0, 2.0, 3.0, 4.0] and readonly.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_named_tuples_keep_their_type():
    Pair = namedtuple("Pair", "x y")
    back = unpack(pack(Pair(torch.ones(1), 2)))
    assert type(back) is Pair and back.y == 2 and torch.equal(back.x, torch.ones(1))
