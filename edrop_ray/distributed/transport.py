"""Weights from the trainer to the evaluators: one collective broadcast of a flat buffer.

The trainer (rank 0) and the evaluators (ranks 1..N) form one ``torch.distributed`` process group
the way Ray Train forms its own: rank 0 names its node's IP and a free port, and every rank calls
``init_process_group(init_method="tcp://ip:port")``. The backend is NCCL when every rank has a
CUDA device of its own and gloo on the CPU, so the same code runs in the CPU tests.

Each weights version is one ``broadcast`` of a pre-allocated flat buffer that holds the model's
parameters and its floating BatchNorm buffers (running mean and variance). On an evaluator the
model's tensors *are* views into that buffer, so nothing is copied after the broadcast (with
``weights_dtype: bf16`` the wire buffer is half the size and one cast fills the fp32 buffer).
``num_batches_tracked`` is not sent: it is read only by BatchNorm in training mode with
``momentum=None``, and evaluators judge in inference mode.

Every init and broadcast carries a timeout, so a dead rank makes the others fail (and the
coordinator re-form the group from the live ranks) instead of waiting for ever.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

__all__ = [
    "WIRE_DTYPES",
    "FlatWeights",
    "GroupMember",
    "free_address",
    "choose_transport",
    "rank_identity",
]

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synced_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and floating buffers, in state_dict order (the same on every rank)."""
    return [
        (name, t) for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()
    ]


class FlatWeights:
    """A flat buffer with one slot per synced tensor, laid out with that tensor's strides
    (so channels_last weights stay channels_last as views).

    ``dtype`` is the buffer's dtype; ``device`` its device (the rank's).
    """

    def __init__(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype):
        self.entries = synced_tensors(model)
        total = sum(t.numel() for _, t in self.entries)
        self.flat = torch.zeros(total, dtype=dtype, device=device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for _, t in self.entries:
            self.views.append(self.flat.as_strided(t.shape, t.stride(), offset))
            offset += t.numel()

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @torch.no_grad()
    def pack(self) -> None:
        """Copy the model's current tensors into the buffer (cast to its dtype)."""
        for view, (_, t) in zip(self.views, self.entries, strict=True):
            view.copy_(t.detach())

    @torch.no_grad()
    def unpack(self, src: torch.Tensor) -> None:
        """The reverse of :meth:`pack`: ``src``, a flat buffer laid out like this one (from
        another rank, on any device), into the model's tensors: one copy to this buffer's
        device, then one per tensor there."""
        if src.shape != self.flat.shape:
            raise ValueError(f"a flat buffer of {src.numel()} values for {self.flat.numel()}")
        self.flat.copy_(src)
        for view, (_, t) in zip(self.views, self.entries, strict=True):
            t.copy_(view)

    @torch.no_grad()
    def bind(self, model: nn.Module) -> None:
        """Make ``model``'s synced tensors views into the buffer (their values are kept).

        The buffer's dtype and device must be the model's.
        """
        self.pack()
        for view, (name, t) in zip(self.views, self.entries, strict=True):
            if view.dtype != t.dtype or view.device != t.device:
                raise ValueError(f"{name}: buffer {view.dtype}/{view.device} vs model's tensor")
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf].data = view
            else:
                module._buffers[leaf] = view


def free_address() -> tuple[str, int]:
    """This node's IP and a port free right now (Ray Train's rendezvous for rank 0)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ip, port


def rank_identity(device: torch.device) -> dict[str, Any]:
    """What placement decides the transport from: pid, node, device type, GPU ids."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "pid": os.getpid(),
        "node_id": ctx.get_node_id(),
        "device": device.type,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def choose_transport(setting: str, ranks: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(transport, backend, reason) for ``weights_transport`` and the ranks' identities
    (trainer first).

    A collective forms when every rank is on the CPU (gloo) or every rank has a CUDA device of
    its own (NCCL). Ranks sharing one GPU (fractional ``gpus_per_evaluator``) or a mix of CPU and
    GPU ranks get the object store under ``auto``; asking for ``collective`` there is an error.
    """
    if setting == "object_store":
        return "object_store", "", "asked for"
    devices = {r["device"] for r in ranks}
    if devices == {"cpu"}:
        return "collective", "gloo", "every rank on the CPU"
    gpus = [(r["node_id"], tuple(r["gpu_ids"])) for r in ranks]
    if devices == {"cuda"} and all(len(g[1]) == 1 for g in gpus) and len(set(gpus)) == len(gpus):
        return "collective", "nccl", "one GPU per rank"
    why = (
        "ranks share a GPU (NCCL needs one GPU per rank)"
        if devices == {"cuda"}
        else "a mix of CPU and GPU ranks"
    )
    if setting == "collective":
        raise UserError(
            f"weights_transport=collective cannot form: {why}; give the trainer and every "
            "evaluator a whole GPU (--set gpus_per_evaluator=1 trainer_gpus=1) or use "
            "--set weights_transport=auto"
        )
    return "object_store", "", why


class GroupMember:
    """One rank's side of the process group and of the weights buffer.

    The trainer publishes (rank 0); an evaluator receives into the buffer its model is bound to.
    ``epoch`` numbers the group's formations, so a rank that missed one (restarted, or late)
    refuses to broadcast in it rather than deadlock the others.
    """

    def __init__(self, model: nn.Module, device: torch.device, wire: str, *, bind: bool):
        self.device = device
        if bind:  # evaluator: the model's tensors become views of an fp32 buffer
            self.home = FlatWeights(model, device=device, dtype=torch.float32)
            self.home.bind(model)
        else:  # trainer: a buffer in the wire dtype, packed once per version
            self.home = FlatWeights(model, device=device, dtype=WIRE_DTYPES[wire])
        dtype = WIRE_DTYPES[wire]
        self.wire = (
            self.home.flat
            if self.home.flat.dtype == dtype
            else torch.empty_like(self.home.flat, dtype=dtype)
        )
        self.epoch = -1
        self.version = -1

    def join(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str,
        timeout_s: float, epoch: int,
    ) -> int:  # fmt: skip
        """Leave any old group and join a new one; blocks until every rank has joined."""
        self.leave()
        if backend == "nccl":
            # abort the communicator on a timeout and raise, instead of tearing the process down
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        ip, port = address
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{ip}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.epoch = epoch
        self.version = -1
        return rank

    def leave(self) -> None:
        self.epoch = -1
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group is left behind either way
                pass

    def _check(self, epoch: int) -> None:
        if epoch != self.epoch or not dist.is_initialized():
            raise RuntimeError(f"not in group {epoch} (this rank is in {self.epoch})")

    def publish(self, version: int, epoch: int, *, pack: bool) -> dict[str, float]:
        """Rank 0: pack (when ``pack``: a new version) and broadcast the buffer."""
        self._check(epoch)
        t0 = time.perf_counter()
        if pack:
            self.home.pack()
        t1 = time.perf_counter()
        dist.broadcast(self.wire, src=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.version = version
        return {"bytes": self.nbytes, "pack_s": t1 - t0, "broadcast_s": time.perf_counter() - t1}

    def receive(self, version: int, epoch: int) -> dict[str, float]:
        """Ranks 1..N: receive the buffer; the bound model then holds the new weights."""
        self._check(epoch)
        self.version = -1  # a failed broadcast leaves no version behind
        t0 = time.perf_counter()
        dist.broadcast(self.wire, src=0)
        if self.wire is not self.home.flat:
            self.home.flat.copy_(self.wire)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.version = version
        return {"bytes": self.nbytes, "broadcast_s": time.perf_counter() - t0}

    @property
    def nbytes(self) -> int:
        return self.wire.numel() * self.wire.element_size()
