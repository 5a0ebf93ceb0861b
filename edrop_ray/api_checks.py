"""Input checks of :func:`edrop_ray.api.prune`: a user's model and data, caught where they enter.

Each check raises ``TypeError`` or ``ValueError`` with one line that says what is wrong and what
the model or data must be, before any training: the model runs on a batch of the data, is traced
and slimmed once, and a spread of samples is read for its shape and label.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .data import DataInfo
from .learner import OwnModel, fetch_batch
from .masking import Masker
from .slim import slim_model
from .units import Units, discover_units

__all__ = ["as_dataset", "check_model_and_data", "check_slimming", "input_size_of"]

_CHECKED_SAMPLES = 64  # samples of an on-disk data set whose shape and label are checked


def as_dataset(data: Any, what: str) -> tuple[Dataset, int | None]:
    """(map-style dataset, the loader's batch size or None)."""
    batch = None
    if isinstance(data, DataLoader):
        data, batch = data.dataset, data.batch_size
    if isinstance(data, IterableDataset) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        raise TypeError(
            f"{what} must be a map-style Dataset of (input, label) items (or a DataLoader over "
            f"one), got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{what} is empty")
    return data, batch


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _item(dataset: Dataset, i: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        item = dataset[i]
    except Exception as e:
        raise ValueError(f"{what}[{i}] cannot be read: {_one_line(e)}") from None
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ValueError(f"{what}[{i}] must be an (input, label) pair, got {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}[{i}]: the input must be a torch.Tensor, got {type(x).__name__}")
    try:
        y = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what}[{i}]: the label {y!r} is not an integer class") from None
    return x, y


def _check_labels(y: torch.Tensor, where: str, num_classes: int) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integer classes, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(
            f"{where}: label {bad} is outside [0, {num_classes}) (the model outputs "
            f"{num_classes} classes)"
        )


def _check_data(dataset: Dataset, what: str, shape: torch.Size, num_classes: int) -> None:
    """Every sample of an in-memory TensorDataset, else a fixed spread of samples: input shape
    ``shape`` and an integer label in [0, num_classes)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(dataset, TensorDataset) and tensors is not None and len(tensors) == 2:
        x, y = tensors
        if x.shape[1:] != shape:
            raise ValueError(
                f"{what} holds inputs of shape {tuple(x.shape[1:])}, the model takes "
                f"{tuple(shape)} (train_set's first input)"
            )
        if y.dim() != 1:
            raise ValueError(f"{what}: labels must be one integer per sample, got shape "
                             f"{tuple(y.shape)}")  # fmt: skip
        _check_labels(y, what, num_classes)
        return
    n = len(dataset)
    for i in sorted({int(i) for i in torch.linspace(0, n - 1, min(_CHECKED_SAMPLES, n))}):
        x, y = _item(dataset, i, what)
        if x.shape != shape:
            raise ValueError(
                f"{what}[{i}] has an input of shape {tuple(x.shape)}, the model takes "
                f"{tuple(shape)} (train_set's first input)"
            )
        if y.dim() != 0:
            raise ValueError(f"{what}[{i}]: the label must be one integer, got shape "
                             f"{tuple(y.shape)}")  # fmt: skip
        _check_labels(y, f"{what}[{i}]", num_classes)


def check_model_and_data(
    model: nn.Module, train_set: Dataset, test_set: Dataset, example: torch.Tensor | None
) -> tuple[OwnModel, tuple[Dataset, Dataset, DataInfo], Units]:
    """The checked model (a CPU copy), data and units; ValueError/TypeError, one line, if not."""
    x0, _y0 = _item(train_set, 0, "train_set")
    if example is None:
        example = torch.zeros(2, *x0.shape, dtype=x0.dtype)
    elif not isinstance(example, torch.Tensor):
        raise TypeError(f"example_inputs must be a tensor, got {type(example).__name__}")
    elif example.shape[1:] != x0.shape:
        raise ValueError(
            f"example_inputs has samples of shape {tuple(example.shape[1:])}, train_set's "
            f"inputs have {tuple(x0.shape)}"
        )
    example = example.detach().cpu()
    try:
        probe = copy.deepcopy(model).cpu()
    except Exception as e:
        raise TypeError(f"the model cannot be copied (copy.deepcopy): {_one_line(e)}") from None
    was_training = probe.training
    try:
        with torch.no_grad():
            logits = probe.eval()(example)
    except Exception as e:
        raise ValueError(
            f"the model fails on inputs of shape {tuple(example.shape)} (train_set's, batched): "
            f"{_one_line(e)}"
        ) from None
    finally:
        probe.train(was_training)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == len(example)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the model must return (batch, classes) logits; on a batch of {len(example)} it "
            f"returned {got}"
        )
    num_classes = int(logits.shape[1])
    if num_classes < 2:
        raise ValueError(f"the model outputs {num_classes} class; a classifier needs >= 2")
    try:
        units = discover_units(probe, example)
    except Exception as e:
        raise ValueError(f"Torch-Pruning cannot trace the model: {_one_line(e)}") from None
    if units.num_units == 0:
        raise ValueError(
            "the model has nothing to prune: no hidden Conv2d/Linear output channel (the last "
            "layer's outputs are the classes)"
        )
    _check_data(train_set, "train_set", x0.shape, num_classes)
    _check_data(test_set, "test_set", x0.shape, num_classes)
    check_slimming(probe, units, train_set, example)
    shape = tuple(x0.shape)
    info = DataInfo(
        name=f"custom:{type(train_set).__qualname__}",
        num_classes=num_classes,
        in_channels=shape[0] if len(shape) >= 2 else 1,
        train_size=len(train_set),
        test_size=len(test_set),
    )
    return OwnModel(probe, example), (train_set, test_set, info), units


@torch.no_grad()
def check_slimming(model: nn.Module, units: Units, train_set: Dataset, example: torch.Tensor):
    """Slim ``model`` at a random state and compare it with the masked model on real inputs:
    some graphs trace but slim wrongly (a channel shuffle, a raw nn.Parameter in F.conv2d)."""
    x, _ = fetch_batch(train_set, torch.arange(min(8, len(train_set))))
    state = torch.rand(units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    was_training = model.training
    masker = Masker(model, units)
    try:
        with torch.enable_grad():  # Torch-Pruning traces the autograd graph
            slim = slim_model(model, units, state, example).eval()
        model.eval()
        with masker.applied(state):
            masked = model(x)
        got = slim(x)
    except Exception as e:
        raise ValueError(f"Torch-Pruning cannot slim the model: {_one_line(e)}") from None
    finally:
        masker.remove()
        model.train(was_training)
    tol = 1e-4 * (1.0 + float(masked.abs().max()))
    diff = float((got - masked).abs().max()) if got.shape == masked.shape else float("inf")
    if not diff <= tol:
        raise ValueError(
            f"Torch-Pruning traces the model but slims it wrongly (the slimmed copy differs from "
            f"the masked model by {diff:.3g}): an operation mixes channels in a way it does not "
            "follow (a channel shuffle, a raw nn.Parameter in F.conv2d, ...)"
        )


def input_size_of(example: torch.Tensor) -> dict[str, int]:
    """The config's input_size for a user's images (C, H, W): their width, for the record."""
    if example.dim() == 4 and 1 <= example.shape[-1] <= 1024:
        return {"input_size": int(example.shape[-1])}
    return {}
