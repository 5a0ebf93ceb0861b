"""Weights through Ray's object store: a dict of tensors vs one flat fp32 array; and the
trainer's state (weights and momentum) to the driver: tensors vs numpy arrays.

Two actors on a private local Ray instance (one thread each): the source publishes a model's
weights, the sink fetches and loads them into its own copy, as the trainer and an evaluator do
with ``weights_transport: object_store``. Both ways are timed alternately, ``--repeats`` times
after a warm-up; the medians of the round trip and of the sink's fetch + load are printed, with
their ratio. Then the driver fetches the source's state dict (the model's tensors and SGD's
momentum after one step, as at a checkpoint) as torch tensors and as
numpy arrays (:func:`edrop_ray.distributed.wire.pack`, unpacked on arrival), alternately, with
the medians. Asserts nothing.

    python benchmarks/bench_object_store.py [--model resnet18] [--repeats 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import ray
import torch

from edrop_ray.cluster import start_private_instance
from edrop_ray.distributed.transport import FlatWeights
from edrop_ray.distributed.wire import pack, unpack
from edrop_ray.models import build_model


class Source:
    def __init__(self, name: str):
        torch.set_num_threads(1)
        self.model = build_model(name, num_classes=10, in_channels=1)
        self.flat = FlatWeights(self.model, device=torch.device("cpu"), dtype=torch.float32)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.model(torch.randn(2, 1, 32, 32)).sum().backward()
        self.opt.step()  # momentum buffers, as in a checkpoint

    def state(self, packed: bool):
        sd = {"model": self.as_dict(), "optimizer": self.opt.state_dict()}
        return pack(sd) if packed else sd

    def as_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def as_flat(self):
        self.flat.pack()
        return self.flat.flat.numpy()


class Sink:
    def __init__(self, name: str):
        torch.set_num_threads(1)
        self.model = build_model(name, num_classes=10, in_channels=1)
        self.flat = FlatWeights(self.model, device=torch.device("cpu"), dtype=torch.float32)

    def load(self, kind: str, ref: list) -> float:
        t0 = time.perf_counter()
        if kind == "dict":
            self.model.load_state_dict(ray.get(ref[0]))
        else:
            with warnings.catch_warnings():  # the store's array is read-only; it is only read
                warnings.simplefilter("ignore", UserWarning)
                src = torch.from_numpy(ray.get(ref[0]))
            self.flat.unpack(src)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_private_instance(num_cpus=2)
    try:
        source = ray.remote(Source).remote(args.model)
        sink = ray.remote(Sink).remote(args.model)
        times: dict[str, list[tuple[float, float]]] = {"dict": [], "flat": []}
        for i in range(args.repeats + 2):
            for kind in ("dict", "flat"):
                t0 = time.perf_counter()
                ref = source.as_dict.remote() if kind == "dict" else source.as_flat.remote()
                load = ray.get(sink.load.remote(kind, [ref]), timeout=300)
                if i >= 2:  # the first two are warm-up
                    times[kind].append((time.perf_counter() - t0, load))
        states: dict[str, list[float]] = {"tensors": [], "arrays": []}
        for i in range(args.repeats + 2):
            for kind in states:
                t0 = time.perf_counter()
                got = ray.get(source.state.remote(kind == "arrays"), timeout=300)
                if kind == "arrays":
                    got = unpack(got)
                if i >= 2:
                    states[kind].append(time.perf_counter() - t0)
                del got
    finally:
        ray.shutdown()
    med = {k: [statistics.median(x[j] for x in v) for j in (0, 1)] for k, v in times.items()}
    nbytes = FlatWeights(
        build_model(args.model, num_classes=10, in_channels=1),
        device=torch.device("cpu"),
        dtype=torch.float32,
    ).nbytes
    print(f"{args.model}: {nbytes / 1e6:.1f} MB per weights version, medians of {args.repeats}")
    for k, (trip, load) in med.items():
        print(f"  {k:4s}: round trip {trip * 1e3:6.1f} ms, fetch + load {load * 1e3:6.1f} ms")
    print(f"  flat / dict round trip: {med['flat'][0] / med['dict'][0]:.2f}x")
    st = {k: statistics.median(v) for k, v in states.items()}
    print(f"the state (weights + momentum) to the driver, medians of {args.repeats}:")
    for k, v in st.items():
        print(f"  as {k:7s}: {v * 1e3:6.1f} ms")
    print(f"  arrays / tensors: {st['arrays'] / st['tensors']:.2f}x")


if __name__ == "__main__":
    main()
