"""The model grid of the paper (torchvision classifiers) adapted to small inputs.

torchvision's classifiers are built for 3x224x224 inputs. For 28-32 px inputs with 1 or 3
channels we swap the first convolution for a 3x3 stride-1 one with the right input channels
(the usual CIFAR-style stem), from outside: torchvision's code is never edited.

Four sources of a model, one name each (``model`` in the config):

- the seven of the paper's grid (:data:`MODELS`), with their stems swapped by name as before;
- every other torchvision classifier (``list_models(module=torchvision.models)``), whose stem is
  the first ``Conv2d`` the input reaches, found by running the model on a 1x3x224x224 input until
  that convolution is called (:func:`find_stem`);
- a timm model by ``timm:<name>`` (the optional extra ``pip install 'edrop-ray[timm]'``), built
  by ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``: timm adapts
  the input channels itself, no weights are downloaded, and the model is used as timm builds it;
- the user's own factory by import path ``package.module:callable``, called as
  ``fn(num_classes=..., in_channels=...)``; it must return an ``nn.Module`` and is used as it is.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.fx
from torch import nn

from .errors import UserError
from .imports import describe_exception, is_import_path, resolve_callable
from .masking import Masker
from .units import Units, check_fits, discover_units

if TYPE_CHECKING:
    from .config import Config
    from .dataset_info import DataInfo

__all__ = [
    "MODELS",
    "model_names",
    "TIMM_PREFIX",
    "build_model",
    "find_stem",
    "load_init_weights",
    "example_input",
    "Replica",
    "build_replica",
    "replica_of",
    "portable_copy",
    "skeleton",
    "materialize",
    "synced_tensors",
]


def _tvm():
    """``torchvision.models``, imported on first use: a process that builds no model by name (an
    actor given a :func:`portable_copy`) never imports torchvision."""
    from torchvision import models as tvm

    return tvm


def _grid_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return getattr(_tvm(), name)(**kwargs)

    build.__name__ = build.__qualname__ = name
    return build


# the paper's grid: torchvision's builder of each, called with torchvision's keyword arguments
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _grid_builder(name)
    for name in (
        "resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "squeezenet1_0",
        "squeezenet1_1",
    )
}  # fmt: skip

# ``timm:<name>``: a timm model. Checked before import paths, which the ``:`` also matches.
TIMM_PREFIX = "timm:"
_TIMM_INSTALL = "pip install 'edrop-ray[timm]'"


@functools.cache
def model_names() -> tuple[str, ...]:
    """Every model name ``model`` takes: the paper's seven first, then torchvision's classifiers."""
    tvm = _tvm()
    listed = tvm.list_models(module=tvm)
    return tuple(MODELS) + tuple(n for n in listed if n not in MODELS)


def _small_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    # 3x3, stride 1, padding 1: a 32 px image keeps its resolution through the stem.
    return nn.Conv2d(
        in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None
    )


class _StemFound(Exception):
    """Raised by the hook of :func:`find_stem` at the first convolution the input reaches."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def find_stem(model: nn.Module, size: int = 224, in_channels: int = 3) -> tuple[str, nn.Conv2d]:
    """``(name, conv)`` of the first ``Conv2d`` that a 1x``in_channels``x``size``x``size`` input
    reaches.

    The model runs (eval, no grad) only until that convolution is called: a pre-hook on every
    ``Conv2d`` stops the forward pass there, so the ops before the stem are all that run. The
    stem must take the input channels itself (not a tensor made from them with more channels).
    """

    def stop(module: nn.Module, _inputs) -> None:
        raise _StemFound(module)

    hooks = [m.register_forward_pre_hook(stop) for m in model.modules() if type(m) is nn.Conv2d]
    was_training = model.training
    found = None
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
    except _StemFound as e:
        found = e.module
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if found is None or found.in_channels != in_channels or found.groups != 1:
        raise ValueError(f"no plain Conv2d on the {in_channels} input channels is the first layer")
    name = next(n for n, m in model.named_modules() if m is found)
    return name, found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)  # Sequential children are named "0", "1", ...: same call


def _build_torchvision(
    name: str, *, num_classes: int, in_channels: int, small_input: bool
) -> nn.Module:
    """Any torchvision classifier not in :data:`MODELS`, its stem found by :func:`find_stem`.

    With ``small_input`` the stem becomes a 3x3 stride-1 padding-1 convolution over
    ``in_channels`` with the old one's outputs and bias; without it only the input channels
    change (kernel, stride, padding and dilation are kept). Auxiliary heads are switched off.
    """
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        model = _tvm().get_model(name, **kwargs)
    except Exception as e:
        raise UserError(f"model {name!r} cannot be built ({describe_exception(e)})") from None
    if in_channels == 3 and not small_input:
        return model
    try:
        stem_name, stem = find_stem(model)
    except Exception as e:
        raise UserError(
            f"model {name!r}: no stem convolution to adapt ({describe_exception(e)}); "
            "try --set small_input=false with 3-channel data, or another model"
        ) from None
    if small_input:
        new = _small_conv(stem, in_channels)
    else:
        new = nn.Conv2d(
            in_channels,
            stem.out_channels,
            stem.kernel_size,
            stride=stem.stride,
            padding=stem.padding,
            dilation=stem.dilation,
            bias=stem.bias is not None,
            padding_mode=stem.padding_mode,
        )
    _set_module(model, stem_name, new)
    return model


def _build_timm(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """``timm:<name>`` built by ``timm.create_model`` without pretrained weights (never a
    download); ``init_weights`` loads a state_dict into it as into any other model."""
    arch = name[len(TIMM_PREFIX) :]
    try:
        import timm
    except ImportError:
        raise UserError(
            f"model {name!r} needs timm, which is not installed; {_TIMM_INSTALL}"
        ) from None
    if not timm.is_model(arch):
        raise UserError(
            f"unknown timm model {arch!r}; list the names with "
            'python -c "import timm; print(timm.list_models())" and pass model=timm:<name>'
        )
    try:
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    except Exception as e:
        raise UserError(f"model {name!r} cannot be built ({describe_exception(e)})") from None


def _build_user(path: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """The user's factory ``fn(num_classes=..., in_channels=...)``; its module used as it is."""
    fn = resolve_callable("model", path)
    try:
        model = fn(num_classes=num_classes, in_channels=in_channels)
    except Exception as e:
        raise UserError(
            f"model {path!r} raised {describe_exception(e)} when called as "
            f"fn(num_classes={num_classes}, in_channels={in_channels})"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model {path!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            "the factory must return the network"
        )
    return model


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, small_input: bool = True
) -> nn.Module:
    """Build a classifier with ``num_classes`` outputs, adapted to small inputs.

    ``name`` is one of :func:`model_names`, ``timm:<name>`` or an import path
    ``package.module:callable``. With ``small_input`` the stem convolution becomes 3x3 stride 1
    over ``in_channels``; the ResNet stem max-pool is kept (it halves 32 px to 16 px, which keeps
    CPU runs affordable). Without it, only the input channels are changed. A user's model and a
    timm model are never adapted (timm takes the input channels itself).
    """
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name, num_classes=num_classes, in_channels=in_channels)
    if is_import_path(name):
        return _build_user(name, num_classes=num_classes, in_channels=in_channels)
    if name not in MODELS:
        if name not in model_names():
            raise UserError(
                f"unknown model {name!r}; choose one of: {', '.join(model_names())}, "
                "or an import path package.module:callable"
            )
        return _build_torchvision(
            name, num_classes=num_classes, in_channels=in_channels, small_input=small_input
        )
    model = MODELS[name](weights=None, num_classes=num_classes)
    if name.startswith("resnet"):
        stem = model.conv1
        model.conv1 = (
            _small_conv(stem, in_channels)
            if small_input
            else nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        )
    else:  # alexnet and squeezenet keep their stem at features[0]
        stem = model.features[0]
        model.features[0] = (
            _small_conv(stem, in_channels)
            if small_input
            else nn.Conv2d(
                in_channels,
                stem.out_channels,
                stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
            )
        )
    return model


def load_init_weights(model: nn.Module, path: str) -> None:
    """Load the state_dict file ``path`` into ``model`` (``torch.load(weights_only=True)``).

    Every key and shape must fit: a UserError names the first missing or unexpected key, or the
    first mismatched shape, before anything is copied.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"init_weights file {path!r} not found; pass an existing state_dict file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only refusals all land here
        raise UserError(
            f"init_weights file {path!r} cannot be read as a state_dict "
            f"({describe_exception(e)}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"init_weights file {path!r} does not hold a state_dict (names to tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    where = f"init_weights file {path!r} does not fit the model"
    if missing:
        raise UserError(f"{where}: key {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise UserError(
            f"{where}: key {unexpected[0]!r} is unexpected ({len(unexpected)} unexpected in all)"
        )
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise UserError(
                f"{where}: {k!r} has shape {tuple(state[k].shape)} in the file but "
                f"{tuple(v.shape)} in the model (check num_classes, in_channels, small_input)"
            )
    model.load_state_dict(state, strict=True)


def example_input(in_channels: int, input_size: int, batch: int = 2) -> torch.Tensor:
    """A deterministic dummy batch (batch, C, H, W) for tracing and counting."""
    return torch.zeros(batch, in_channels, input_size, input_size)


class Replica(NamedTuple):
    """A model ready for EDropout on one device: its units and its masking hooks."""

    model: nn.Module
    units: Units
    masker: Masker
    example: torch.Tensor  # (2, C, H, W) zeros on the CPU, for tracing and counting
    memory_format: torch.memory_format


def _discover(cfg: Config, model: nn.Module, example: torch.Tensor) -> Units:
    """:func:`discover_units`, with a model that cannot be traced at this size one UserError."""
    try:
        return discover_units(model, example)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"model {cfg.model!r} cannot be traced on {tuple(example.shape[1:])} inputs "
            f"({describe_exception(e)}); try a larger --set input_size (e.g. 64 or 224), "
            "--set small_input=false, or another model"
        ) from None


def build_replica(
    cfg: Config, info: DataInfo, device: torch.device, units: Units | None = None
) -> Replica:
    """The run's model on ``device`` (channels-last if configured), its units found by tracing on
    the CPU, and a :class:`Masker` on it. The trainer and every evaluator build theirs here, so
    their models, units and hooks are the same. Seed torch first for reproducible weights.

    With ``init_weights`` the file's weights replace the initial ones (after the stem is adapted),
    so the dense baseline, the trainer and every evaluator start from them. ``units``: the
    model's units when already traced (the driver's, shipped to the actors), checked to fit."""
    model = build_model(
        cfg.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        small_input=cfg.small_input,
    )
    if cfg.init_weights:
        load_init_weights(model, cfg.init_weights)
    example = example_input(info.in_channels, cfg.input_size)
    return replica_of(model, example, cfg, device, units)


def replica_of(
    model: nn.Module,
    example: torch.Tensor,
    cfg: Config,
    device: torch.device,
    units: Units | None = None,
) -> Replica:
    """:func:`build_replica` for a model that already exists (a user's own, with its weights):
    its units traced on the CPU with ``example`` (a CPU batch), then moved to ``device``.

    Given ``units`` (traced by another process on the same model), they are checked to fit
    this model and the tracing is skipped: tracing takes seconds of CPU and Torch-Pruning's
    import, paid once by the driver instead of once per actor."""
    model = model.to("cpu")
    if units is None:
        units = _discover(cfg, model, example)
    else:
        check_fits(units, model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    return Replica(model, units, Masker(model, units), example, fmt)


# modules a portable copy's graph may call functions of (torch's own, and Python's operators)
_PORTABLE_FUNCTIONS = ("torch", "_operator", "operator", "builtins", "math")


def portable_copy(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """A copy of ``model`` (on the CPU, with its weights) that unpickles with torch alone, or None.

    The copy is ``model`` traced by ``torch.fx``: a ``GraphModule`` holding the same leaf
    modules under the same names (so the same state-dict keys, units and masking hooks) and
    calling the same functions in the same order. Its pickle names only torch's classes, so a
    process that unpickles it imports neither torchvision nor timm nor a user's module; the Ray
    actors build their replicas from it (1.3-2 CPU-seconds less each to start, most of it
    ``torch._dynamo``, which torchvision imports). The copy carries no hooks (a replica adds its
    masking hooks itself).

    None, and the caller builds the model as before, when the copy could differ from ``model``:
    the model cannot be traced; its forward reads ``self.training`` (the traced code in train and
    in eval mode differs, e.g. stochastic depth); a leaf module or a called function is not
    torch's; or its output on ``example`` (eval mode, ``model``'s hooks applied) is not
    bit-identical to the copy's.
    """
    source = copy.deepcopy(model).to("cpu")
    try:
        with torch.no_grad():
            expected = source.eval()(example)
        traced = torch.fx.symbolic_trace(source.train())
        if torch.fx.symbolic_trace(source.eval()).code != traced.code:
            return None
    except Exception:  # not traceable: dynamic control flow, unsupported ops
        return None
    for m in traced.modules():
        if m is not traced and not type(m).__module__.startswith("torch."):
            return None
    for node in traced.graph.nodes:
        if node.op == "call_function":
            home = getattr(node.target, "__module__", None) or ""
            if home.split(".")[0] not in _PORTABLE_FUNCTIONS:
                return None
    for m in traced.modules():  # the leaves are source's own modules: source is a copy too
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                      "_forward_hooks_always_called"):  # fmt: skip
            getattr(m, hooks, {}).clear()
    try:
        with torch.no_grad():
            same = torch.equal(expected, traced.eval()(example))
    except Exception:  # e.g. an output that is not one tensor
        return None
    return traced.train(model.training) if same else None


def synced_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a replica receives as its weights: parameters and floating buffers, in
    state_dict order (the same on every rank). The rest (integer buffers, buffers outside the
    state dict) every replica holds from its own build."""
    return [
        (name, t) for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()
    ]


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its weights: the tensors of :func:`synced_tensors` on the
    ``meta`` device (ResNet-18: about 21 kB pickled, against 45 MB), every other tensor kept
    with its values (a replica receives only the synced ones). Tied tensors stay tied."""
    bare = copy.deepcopy(model)
    synced = {id(t) for _, t in synced_tensors(bare)}
    _replace_tensors(bare, lambda t: id(t) in synced, lambda t: torch.empty_like(t, device="meta"))
    return bare


def materialize(model: nn.Module) -> nn.Module:
    """``model`` (a :func:`skeleton`) with its ``meta`` tensors replaced by zeros on the CPU, in
    place: a replica whose weights arrive later (an evaluator's, from the trainer) holds zeros
    until then, never stale memory. A model with no ``meta`` tensor is returned as it is."""
    _replace_tensors(
        model, lambda t: t.device.type == "meta", lambda t: torch.zeros(t.shape, dtype=t.dtype)
    )
    return model


def _replace_tensors(model: nn.Module, which, make) -> None:
    """Replace every parameter and buffer ``t`` of ``model`` with ``which(t)`` by ``make(t)``
    (a parameter stays a parameter, with its ``requires_grad``), the same object once for
    every module that shares it."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, kept alive; new)
    for m in model.modules():
        for slots, is_param in ((m._parameters, True), (m._buffers, False)):
            for key, t in slots.items():
                if t is None or not which(t):
                    continue
                if id(t) not in done:
                    new = make(t.detach())
                    done[id(t)] = (t, nn.Parameter(new, t.requires_grad) if is_param else new)
                slots[key] = done[id(t)][1]
