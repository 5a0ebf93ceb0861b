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

A generation is proposed and judged over the same group, with one Ray call in all (the
trainer's) instead of one per evaluator: each evaluator serves in a loop
(:meth:`GroupMember.next_request`, :meth:`GroupMember.reply`), and rank 0
(:meth:`GroupMember.request`) runs one exchange per generation:

1. a header to each rank (point to point): judge or stop, the weights version, whether new
   weights follow, the population's shape, the generation, the batch's shapes and dtypes;
2. a flag to each rank (point to point, 8 bytes): GO; or ABORT, when a rank's header failed
   (it died since the last exchange): then the live ones go back to the coordinator instead of
   into a collective that cannot finish;
3. the inputs, by one broadcast: the batch and the population, bit-packed (1.5 MB for 1,024
   members of ResNet-50's 11,456 units). Each rank proposes the trials of its contiguous shard
   of the members (:func:`shard_bounds`) itself, so the proposal's work is spread over the
   ranks;
4. the weights, by broadcast, when they are new;
5. each rank's energies (its members', then their trials'), its trials, bit-packed, and its
   timings back to rank 0, by one gather (every answer padded to the longest shard), read in
   one go.

Only the two small messages of steps 1 and 2 are sent rank by rank, both back to back (a rank
wakes once for them): they are what lets a rank that died between generations be seen at once
and cost no timeout, since a point-to-point send fails for that rank only. Everything that
grows with the batch, the population or the answers goes by collectives, whose cost at rank 0
does not grow by a Python call per rank (a tree for the broadcasts). A rank that dies after
the flags fails a collective: rank 0 raises, and the ranks that were not its neighbours wait
for the group's timeout, as on NCCL, where a dead peer is never seen sooner.
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
from ..models import synced_tensors

__all__ = [
    "WIRE_DTYPES",
    "FlatWeights",
    "GroupMember",
    "free_address",
    "choose_transport",
    "rank_identity",
    "shard_bounds",
    "Request",
]

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def _reset_group_count() -> None:
    """Number the next default group 0 on every rank, as a fresh process does.

    torch names a process group's rendezvous keys after a per-process counter that
    ``destroy_process_group`` resets but a *failed* ``init_process_group`` (a rank that timed
    out) leaves advanced; a rank retrying after a failed formation would then wait for keys no
    fresh rank writes, and the group could never form again. (The counter is private to
    ``torch.distributed``; ``tests/test_transport.py`` checks a retry after a failed join.)
    """
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        c10d._world.group_count = 0


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
        self.timeout_s = 60.0

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
        _reset_group_count()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{ip}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.epoch = epoch
        self.version = -1
        self.timeout_s = timeout_s
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

    # --- judging over the group (module docstring: one exchange per generation)
    def request(
        self, version: int, epoch: int, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
        *, generation: int, send_weights: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """Rank 0: have ranks 1..N propose and judge generation ``generation`` of the
        population ``rows`` (uint8, one bit-packed row per member) on ``(x, y)`` with weights
        ``version`` (broadcast too when ``send_weights``). Each rank takes the contiguous
        shard :func:`shard_bounds` gives it of the members, proposes their trials and judges
        members and trials.

        Returns the energies of all members then of all trials (member order), the trials
        (uint8, bit-packed rows), each rank's compute, receive and propose seconds, and the
        weights' broadcast figures (None when none went out). Raises RuntimeError naming the
        ranks that did not answer (when their headers failed, the others were told ABORT), or
        when a collective failed.
        """
        self._check(epoch)
        t_start = time.perf_counter()
        dev, ranks = self.device, range(1, dist.get_world_size())
        num, width = rows.shape
        header = torch.tensor(
            [JUDGE, version, int(send_weights), num, width, generation,
             *_describe(x), *_describe(y)],
            dtype=torch.int64,
        ).to(dev)  # fmt: skip
        works, failed = _post(dist.isend, dict.fromkeys(ranks, header))
        # a rank gone since the last exchange fails its header at once: then the others are
        # told ABORT, before any collective, and the exchange fails. The flags go out right
        # behind the headers: a rank wakes once for both.
        flag = torch.tensor([ABORT if failed else GO], dtype=torch.int64).to(dev)
        more, failed_flags = _post(dist.isend, {r: flag for r in ranks if r not in failed})
        failed |= failed_flags | _wait(works, self.timeout_s) | _wait(more, self.timeout_s)
        if failed:
            raise _unanswered(failed)
        inputs = _as_bytes([x, y, rows]).to(dev)  # one copy to the device, one broadcast
        _collective(dist.broadcast, inputs, src=0)
        t_weights = time.perf_counter()
        sync = None
        if send_weights:
            t0 = time.perf_counter()
            dist.broadcast(self.wire, src=0)
            self.version = version
            sync = {"bytes": self.nbytes, "broadcast_s": time.perf_counter() - t0}
        shards = len(ranks)
        most = shard_bounds(num, shards, 0)[1]  # every answer padded to the longest shard
        out = torch.empty(shards + 1, _answer_bytes(most, width), dtype=torch.uint8, device=dev)
        t_gather = time.perf_counter()
        _collective(dist.gather, torch.zeros_like(out[0]), list(out.unbind(0)), dst=0)
        counts = torch.tensor([shard_bounds(num, shards, k)[1] for k in range(shards)])
        answers = _read_answers(out[1:].cpu(), counts, most, width)
        answers["sync"] = sync
        t_end = time.perf_counter()
        # rank 0's seconds: header and inputs out, the answers (waiting for them: the
        # slowest rank's compute is in it), and the whole exchange
        answers["phases"] = {
            "inputs_s": t_weights - t_start, "answers_s": t_end - t_gather,
            "exchange_s": t_end - t_start,
        }  # fmt: skip
        return answers

    def stop(self, epoch: int, ranks: list[int]) -> list[int]:
        """Rank 0: tell ``ranks`` (waiting for a request) to stop serving; those told."""
        self._check(epoch)
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)  # STOP
        failed = _p2p(dist.isend, dict.fromkeys(ranks, header), self.timeout_s)
        return [r for r in ranks if r not in failed]

    def next_request(self, epoch: int) -> Request | None:
        """Ranks 1..N: wait for rank 0's next request; None when told to stop (or the exchange
        was aborted). New weights arrive into the bound buffer on the way."""
        self._check(epoch)
        dev = self.device
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=dev)
        flag = torch.empty(1, dtype=torch.int64, device=dev)
        dist.recv(header, src=0)
        h = header.cpu().tolist()  # one device -> host copy
        if h[0] == STOP:
            return None
        version, new, num, width, generation = h[1:_HEAD]
        start, count = shard_bounds(num, dist.get_world_size() - 1, dist.get_rank() - 1)
        dist.recv(flag, src=0)
        if int(flag.item()) != GO:
            return None
        parts = [
            _empty(h[_HEAD : _HEAD + 2 + _MAX_DIMS], dev),
            _empty(h[_HEAD + 2 + _MAX_DIMS :], dev),
            torch.empty(num, width, dtype=torch.uint8, device=dev),
        ]
        inputs = torch.empty(sum(_nbytes(t) for t in parts), dtype=torch.uint8, device=dev)
        dist.broadcast(inputs, src=0)
        x, y, rows = _from_bytes(inputs, parts)
        receive_s = 0.0
        if new:
            receive_s = self.receive(version, epoch)["broadcast_s"]
        elif version != self.version:
            raise RuntimeError(f"asked to judge with weights {version}, holding {self.version}")
        return Request(version, rows, range(start, start + count), generation, x, y, receive_s)

    def reply(
        self, req: Request, energies: torch.Tensor, trials: torch.Tensor,
        seconds: tuple[float, float, float],
    ) -> None:  # fmt: skip
        """Ranks 1..N, answering ``req``: the energies of this rank's members then of their
        trials, the trials (uint8, bit-packed rows) and the seconds spent computing, receiving
        weights and proposing, to rank 0 in one gather (padded to the longest shard's size)."""
        num, width = req.rows.shape
        most = shard_bounds(num, dist.get_world_size() - 1, 0)[1]
        count = len(req.members)
        floats = torch.zeros(2 * most + _TRAILER, dtype=torch.float64)
        floats[:count] = energies[:count].reshape(-1).double().cpu()
        floats[most : most + count] = energies[count:].reshape(-1).double().cpu()
        floats[2 * most :] = torch.tensor([*seconds, _DTYPES.index(energies.dtype)],
                                          dtype=torch.float64)  # fmt: skip
        out = torch.zeros(_answer_bytes(most, width), dtype=torch.uint8)
        out[: floats.numel() * 8] = floats.view(torch.uint8)
        out[floats.numel() * 8 :][: count * width] = trials.cpu().reshape(-1)
        dist.gather(out.to(self.device), dst=0)


# --- judging over the group: one exchange per generation, run by rank 0

STOP, JUDGE = 0, 1  # a header's command
ABORT, GO = 0, 1  # the flag that leads each rank's inputs
# dtypes a batch or an energy may have on the wire, by code
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip
_MAX_DIMS = 6
_HEAD = 6  # command, version, new weights, members, bytes per packed state, generation
HEADER_LEN = _HEAD + 2 * (2 + _MAX_DIMS)  # then (dtype, ndim, shape...) of x and of y


def shard_bounds(num: int, shards: int, k: int) -> tuple[int, int]:
    """(start, count) of shard ``k`` of ``num`` items split into ``shards`` contiguous ones, as
    ``torch.tensor_split`` splits them (the first ``num % shards`` one longer)."""
    base, extra = divmod(num, shards)
    return k * base + min(k, extra), base + (1 if k < extra else 0)


_TRAILER = 4  # after a rank's energies: compute, receive and propose seconds, the dtype's code


def _answer_bytes(count: int, width: int) -> int:
    """Bytes of a rank's answer for ``count`` members of ``width`` packed bytes each, rounded
    up to a multiple of 8 (so every rank's row of a gathered answer reads as float64)."""
    return 8 * (2 * count + _TRAILER) + -(-count * width // 8) * 8


def _read_answers(a: torch.Tensor, counts: torch.Tensor, most: int, width: int) -> dict:
    """The ranks' answers (uint8 rows of ``most`` members' room each, as
    :meth:`GroupMember.reply` sends them; rank k used the first ``counts[k]``), read at once:
    shards are contiguous, so rank order is member order."""
    floats = a[:, : 8 * (2 * most + _TRAILER)].view(torch.float64)
    dtype = _DTYPES[int(floats[0, -1])]
    members, trials_e = floats[:, :most], floats[:, most : 2 * most]
    trials = a[:, 8 * (2 * most + _TRAILER) :][:, : most * width].reshape(-1, most, width)
    if bool((counts == most).all()):  # no padding: plain views
        members, trials_e, trials = members.reshape(-1), trials_e.reshape(-1), trials.flatten(0, 1)
    else:
        used = torch.arange(most) < counts[:, None]  # (ranks, most): the members each rank had
        members, trials_e, trials = members[used], trials_e[used], trials[used]
    return {
        "energies": torch.cat([members, trials_e]).to(dtype),
        "trials": trials,
        "compute_s": floats[:, -4].tolist(),
        "receive_s": floats[:, -3].tolist(),
        "propose_s": floats[:, -2].tolist(),
    }


def _describe(t: torch.Tensor) -> list[int]:
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"a batch tensor of {t.dim()} dims (at most {_MAX_DIMS} travel)")
    return [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (_MAX_DIMS - t.dim())]


def _empty(desc: list[int], device: torch.device) -> torch.Tensor:
    code, ndim, *shape = desc
    return torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` back to back as one flat uint8 tensor (one message for all of them)."""
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def _from_bytes(payload: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reverse of :func:`_as_bytes`, into tensors shaped and typed as ``like``."""
    out, offset = [], 0
    for t in like:
        n = _nbytes(t)
        t.reshape(-1).view(torch.uint8).copy_(payload[offset : offset + n])
        out.append(t)
        offset += n
    return out


class Request:
    """What an evaluator does in one exchange: propose the trials of ``members`` (a range of
    the population's indices) of the population ``rows`` (uint8, bit-packed, every member's)
    in generation ``generation``, and judge members and trials on the generation's batch with
    the weights of ``version``."""

    def __init__(self, version: int, rows: torch.Tensor, members: range, generation: int,
                 x: torch.Tensor, y: torch.Tensor, receive_s: float):  # fmt: skip
        self.version, self.rows, self.members, self.generation = version, rows, members, generation
        self.x, self.y = x, y
        self.receive_s = receive_s  # seconds spent receiving new weights (0 when none came)


def _collective(op, *args, **kwargs) -> None:
    """Rank 0's side of a collective; a failure (a rank died since the flags went out) is
    raised as the group's, for the coordinator to re-form it."""
    try:
        op(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a dead or hung peer: the group is broken
        raise RuntimeError(f"the group's exchange failed (a rank is gone): {e!r}") from e


def _unanswered(failed: dict[int, Exception]) -> RuntimeError:
    return RuntimeError(f"ranks {sorted(failed)} did not answer: {next(iter(failed.values()))!r}")


def _post(op, tensors: dict[int, torch.Tensor]) -> tuple[dict[int, Any], dict[int, Exception]]:
    """``op`` (``dist.isend`` or ``dist.irecv``) with each rank's tensor, all in flight at once:
    (rank -> work, rank -> error of the ranks whose op failed at once: a peer known gone)."""
    works, failed = {}, {}
    for rank, t in tensors.items():
        try:
            works[rank] = op(t, rank)
        except Exception as e:  # noqa: BLE001 - a dead peer: that rank failed
            failed[rank] = e
    return works, failed


def _wait(works: dict[int, Any], timeout_s: float) -> dict[int, Exception]:
    """Wait for every op; the ranks whose op failed (a dead peer, or a hung one at the
    timeout)."""
    failed = {}
    for rank, work in works.items():
        try:
            work.wait(timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - a dead or hung peer: that rank failed
            failed[rank] = e
    return failed


def _p2p(op, tensors: dict[int, torch.Tensor], timeout_s: float) -> dict[int, Exception]:
    """:func:`_post`, then :func:`_wait`: the ranks whose op failed."""
    works, failed = _post(op, tensors)
    return failed | _wait(works, timeout_s)
