"""A second device on a machine that has only a CPU, strict about device mix-ups.

``other_device()`` is a context manager yielding ``torch.device("fakegpu", 0)``: inside it, tensors
can be created on or moved to that device (``x.to(dev)``, ``model.to(dev)``, ``torch.zeros(...,
device=dev)``) and computed on like on a GPU. Each is a wrapper around a real CPU tensor that
reports the other device, so ``.item()``, autograd and optimisers work. Any operation that mixes
it with a CPU tensor (other than a 0-dim CPU scalar, or a copy between the two) raises
:class:`DeviceMixError`, the way CUDA refuses ``cuda_tensor * cpu_tensor``. So a CPU-only test
fails on every device mix-up that would crash on a GPU.

The device is PyTorch's PrivateUse1 backend, renamed and given a Python device guard (the
autograd engine and autocast need one); this is set up once per process, when this module is
imported (before any backward pass), and touches nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceMixError", "other_device", "FAKE"]

FAKE = "fakegpu"
_aten = torch.ops.aten
# Real devices allow these across devices: they are how data moves.
_CROSS_DEVICE_OK = {_aten._to_copy.default, _aten.copy_.default}


class DeviceMixError(RuntimeError):
    """An operation got tensors on two devices (what CUDA raises as a RuntimeError)."""


class _Backend:  # what torch asks of a backend module
    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def device_count(self) -> int:
        return 1

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.bfloat16]


def _register() -> None:
    if torch._C._get_privateuse1_backend_name() == FAKE:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename=FAKE, backend_module=_Backend())


# At import, i.e. at test collection: the autograd engine sizes its per-device queues at the
# process's first backward pass, and a device registered after that cannot run a backward.
_register()


class FakeGpuTensor(torch.Tensor):
    """A CPU tensor ``data`` that says it lives on the other device."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=device,
            requires_grad=False,
        )

    def __init__(self, data: torch.Tensor, device: torch.device):
        self.cpu_data = data

    def __repr__(self) -> str:
        return f"FakeGpuTensor({self.cpu_data!r}, device={self.device})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_fake_device(d) -> bool:
    return d is not None and torch.device(d).type == FAKE


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
    if len(devices) > 1 and func not in _CROSS_DEVICE_OK:
        names = ", ".join(sorted(str(d) for d in devices))
        raise DeviceMixError(
            f"Expected all tensors to be on the same device, but found {names} in {func}"
        )
    target = kwargs.get("device")
    if target is not None:
        on_fake = _is_fake_device(target)
    elif func in _CROSS_DEVICE_OK:
        on_fake = isinstance(args[0], FakeGpuTensor)  # copy_: the destination's device
    else:
        on_fake = any(isinstance(t, FakeGpuTensor) for t in tensors)
    device = next(
        (t.device for t in tensors if isinstance(t, FakeGpuTensor)), torch.device(FAKE, 0)
    )
    if target is not None and on_fake:
        device = torch.device(target)
        kwargs = {**kwargs, "device": torch.device("cpu")}

    def unwrap(t):
        return t.cpu_data if isinstance(t, FakeGpuTensor) else t

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    schema = func._schema
    if (
        schema.arguments
        and schema.arguments[0].alias_info is not None
        and schema.arguments[0].alias_info.is_write
    ):
        return args[0]  # in place: the wrapper is the result
    if "out" in kwargs:
        return kwargs["out"]
    if not on_fake:
        return out
    return tree_map(lambda t: FakeGpuTensor(t, device) if isinstance(t, torch.Tensor) else t, out)


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


@contextmanager
def other_device() -> Iterator[torch.device]:
    """Inside: ``torch.device("fakegpu", 0)`` behaves as a second, strict device."""
    with _Guard():
        yield torch.device(FAKE, 0)
