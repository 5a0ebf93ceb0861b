"""Datasets: a name and a data root in, ``(train, test, info)`` out.

Two small sets live fully in memory as ``TensorDataset``s and need no download: ``digits``
(scikit-learn's 8x8 digits) and ``mnist-test-split`` (the real 10,000-image MNIST test split,
split 80/20 with a seed). The rest go through torchvision's own classes in their usual on-disk
layout under ``data_root``. Missing files are reported as a :class:`UserError` before torchvision
is asked, because its own error says neither which files nor where.

``dataset`` may also be the user's own function by import path ``package.module:callable``: it is
called with no arguments and returns ``(train, test)``, map-style datasets of ``(input, label)``
with inputs ``(C, H, W)`` float tensors, ``H == W == input_size``, and integer labels. They are
used as they are (no resize, no normalisation); see :func:`load_user_datasets`.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets, transforms

from edrop_ray.dataset_info import DataInfo
from edrop_ray.errors import UserError
from edrop_ray.imports import describe_exception, is_import_path, resolve_callable
from edrop_ray.seeds import stream

__all__ = [
    "DATASETS",
    "DataInfo",
    "load_datasets",
    "load_user_datasets",
    "load_for",
    "make_loader",
]

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist-test-split",
    "mnist",
    "kmnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "flowers102",
)
_TRAIN_FRACTION = 0.8  # the in-memory sets have no official split; 80/20 with a seed
_MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# torchvision's CIFAR and Flowers102 classes compare md5 sums of the original downloads. Files
# re-packed locally (or fabricated in tests) are laid out and encoded the same way but hash
# differently, and hashing 170 MB on every start costs time; these subclasses check existence only.
# md5 None makes torchvision's check_integrity(path, None) a plain isfile().
class _CIFAR10Files(datasets.CIFAR10):
    """CIFAR10 that accepts any files in the right place (no md5 check)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(datasets.CIFAR100):
    """CIFAR100 that accepts any files in the right place (no md5 check)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _Flowers102Files(datasets.Flowers102):
    """Flowers102 that accepts any files in the right place (no md5 check)."""

    def _check_integrity(self) -> bool:
        base = Path(self.root) / "flowers-102"
        return (base / "jpg").is_dir() and all(
            (base / name).is_file() for name in ("imagelabels.mat", "setid.mat")
        )


@dataclass(frozen=True)
class _VisionSpec:
    """How to open one torchvision dataset and what it must find on disk."""

    cls: type[Dataset]
    folder: str  # relative to data_root
    files: tuple[str, ...]  # relative to folder; a trailing "/" names a directory
    num_classes: int
    mean: tuple[float, ...]  # usual published per-channel statistics of the train split
    std: tuple[float, ...]


_VISION: dict[str, _VisionSpec] = {
    "mnist": _VisionSpec(datasets.MNIST, "MNIST/raw", _MNIST_RAW, 10, (0.1307,), (0.3081,)),
    "kmnist": _VisionSpec(datasets.KMNIST, "KMNIST/raw", _MNIST_RAW, 10, (0.1918,), (0.3483,)),
    "fashion-mnist": _VisionSpec(
        datasets.FashionMNIST, "FashionMNIST/raw", _MNIST_RAW, 10, (0.2860,), (0.3530,)
    ),
    "cifar10": _VisionSpec(
        _CIFAR10Files,
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _VisionSpec(
        _CIFAR100Files,
        "cifar-100-python",
        ("train", "test", "meta"),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "flowers102": _VisionSpec(  # ImageNet statistics, as usual for Flowers102
        _Flowers102Files,
        "flowers-102",
        ("jpg/", "imagelabels.mat", "setid.mat"),
        102,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    ),
}


def load_datasets(
    name: str,
    *,
    data_root: str | Path,
    input_size: int = 32,
    download: bool = False,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Return ``(train, test, info)``.

    Items are ``(image, label)``: a normalised float tensor ``(C, input_size, input_size)`` and an
    int64 scalar tensor. ``seed`` fixes the train/test split of the two in-memory sets.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise UserError(f"input_size must be a positive integer, got {input_size!r}")
    if is_import_path(name):
        return load_user_datasets(name, input_size=input_size)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    root = Path(data_root).expanduser()
    if name == "digits":
        images, labels = _read_digits()
    elif name == "mnist-test-split":
        images, labels = _read_mnist_test_split(root)
    else:
        return _load_vision_datasets(name, root, input_size, download)
    train, test = _split_tensors(_resize_images(images, input_size), labels, seed)
    info = DataInfo(name, 10, 1, len(train), len(test))
    return train, test, info


def _read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` floats in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits  # slow import; only this set needs it

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)


def _read_mnist_test_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST t10k files under ``root/MNIST/raw`` as ``(N, 1, 28, 28)`` floats in [0, 1].

    Each file may be gzipped (as distributed) or not. torchvision's readers want a plain file, so a
    ``.gz`` is decompressed into a temporary directory: ``root`` may be read-only and shared.
    """
    raw = root / "MNIST" / "raw"
    stems = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = {s: next((p for p in (raw / s, raw / f"{s}.gz") if p.is_file()), None) for s in stems}
    missing = [f"MNIST/raw/{s}.gz" for s, path in found.items() if path is None]
    if missing:
        raise UserError(
            f"dataset 'mnist-test-split': missing {', '.join(missing)} under {root}; put the "
            "MNIST test files there (this set is never downloaded)"
        )
    images = _read_idx_file(found[stems[0]], datasets.mnist.read_image_file)
    labels = _read_idx_file(found[stems[1]], datasets.mnist.read_label_file)
    if len(images) != len(labels):
        raise UserError(
            f"dataset 'mnist-test-split': {len(images)} images but {len(labels)} labels in {raw}; "
            "replace the files with a matching pair"
        )
    return images.unsqueeze(1).float() / 255.0, labels


def _read_idx_file(path: Path, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read one idx file with torchvision's ``read``, gunzipping a ``.gz`` into a temp dir first."""
    try:
        if path.suffix != ".gz":
            return read(str(path))
        with tempfile.TemporaryDirectory(prefix="edrop-mnist-") as tmp:
            plain = Path(tmp) / path.stem
            plain.write_bytes(gzip.decompress(path.read_bytes()))
            return read(str(plain))
    # torchvision's readers assert on a bad header; gzip raises OSError or EOFError.
    except (AssertionError, ValueError, TypeError, KeyError, OSError, EOFError) as exc:
        raise UserError(
            f"dataset 'mnist-test-split': {path} is not a readable MNIST idx file ({exc}); "
            "replace it with the original"
        ) from exc


def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``(N, C, size, size)``; a no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


def _split_tensors(
    images: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Seeded 80/20 split, normalised with the train part's mean and std (no test leakage)."""
    order = torch.randperm(len(images), generator=stream(seed, "data_split"))
    cut = int(len(images) * _TRAIN_FRACTION)
    train_idx, test_idx = order[:cut], order[cut:]
    mean, std = images[train_idx].mean(), images[train_idx].std().clamp_min(1e-8)
    train = TensorDataset((images[train_idx] - mean) / std, labels[train_idx])
    test = TensorDataset((images[test_idx] - mean) / std, labels[test_idx])
    return train, test


def _to_label_tensor(label: int) -> torch.Tensor:
    """int label -> int64 scalar tensor, the same item type as the in-memory sets."""
    # A module-level function, not a lambda: datasets are pickled when shipped to Ray workers.
    return torch.tensor(label, dtype=torch.int64)


def _find_missing_files(spec: _VisionSpec, root: Path) -> list[str]:
    """The files (relative to ``root``) that ``spec`` needs and that are not there."""
    folder = root / spec.folder
    return [
        f"{spec.folder}/{rel}"
        for rel in spec.files
        if not ((folder / rel).is_dir() if rel.endswith("/") else (folder / rel).is_file())
    ]


def _load_vision_datasets(
    name: str, root: Path, input_size: int, download: bool
) -> tuple[Dataset, Dataset, DataInfo]:
    """Open a torchvision dataset's train and test splits; images are transformed per item."""
    spec = _VISION[name]
    if not download:
        missing = _find_missing_files(spec, root)
        if missing:
            raise UserError(
                f"dataset {name!r}: missing {', '.join(missing)} under {root}; put the files "
                "there or pass --set download=true"
            )
    transform = transforms.Compose(
        [
            transforms.Resize((input_size, input_size)),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    opened = []
    for train in (True, False):
        # Flowers102 names its splits; the others take a train flag.
        if spec.cls is _Flowers102Files:
            split: dict[str, object] = {"split": "train" if train else "test"}
        else:
            split = {"train": train}
        try:
            opened.append(
                spec.cls(
                    root,
                    transform=transform,
                    target_transform=_to_label_tensor,
                    download=download,
                    **split,
                )
            )
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            if not download:
                raise
            reason = " ".join(str(exc).split())  # torchvision's messages span several lines
            raise UserError(
                f"dataset {name!r}: download to {root} failed ({reason}); "
                "check the network or put the files there by hand"
            ) from exc
    train_set, test_set = opened
    in_channels = len(spec.mean)  # one statistic per channel
    info = DataInfo(name, spec.num_classes, in_channels, len(train_set), len(test_set))
    return train_set, test_set, info


def _labels_of(dataset: Dataset) -> torch.Tensor:
    """Every label of ``dataset`` (a TensorDataset's second tensor, else item by item)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        return tensors[1].reshape(-1)
    return torch.stack([torch.as_tensor(dataset[i][1]).reshape(()) for i in range(len(dataset))])


def load_user_datasets(path: str, *, input_size: int) -> tuple[Dataset, Dataset, DataInfo]:
    """``(train, test, info)`` from the user's function ``path`` (``package.module:callable``).

    The function is called with no arguments and returns ``(train, test)``. ``info`` is inferred:
    ``in_channels`` from the first training input ``(C, H, W)``, which must be square with
    ``H == input_size``; ``num_classes`` is ``len(train.classes)`` when the training set has a
    ``classes`` attribute (torchvision's convention), else the largest label of either set + 1.
    """
    fn = resolve_callable("dataset", path)
    where = f"dataset {path!r}"
    try:
        result = fn()
    except Exception as e:
        raise UserError(f"{where} raised {describe_exception(e)} when called as fn()") from None
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise UserError(
            f"{where} returned a {type(result).__name__}, not (train, test): two map-style "
            "datasets of (input, label)"
        )
    train, test = result
    for split, ds in (("train", train), ("test", test)):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise UserError(
                f"{where}: its {split} set is a {type(ds).__name__}, not a map-style dataset "
                "(__getitem__ and __len__), e.g. a TensorDataset"
            )
        if len(ds) == 0:
            raise UserError(f"{where}: its {split} set is empty")
    try:
        item = train[0]
        x, y = item
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        classes = getattr(train, "classes", None)
        # with `classes` no pass over the data (a large on-disk set would decode every image)
        labels = (
            y.reshape(1)
            if classes is not None
            else torch.cat([_labels_of(train), _labels_of(test)])
        )
    except Exception as e:
        raise UserError(
            f"{where}: its items are not (input, label) pairs of tensors ({describe_exception(e)})"
        ) from None
    if x.dim() != 3 or x.dtype != torch.float32:
        raise UserError(
            f"{where}: its inputs must be float32 tensors (C, H, W), got {x.dtype} of shape "
            f"{tuple(x.shape)}"
        )
    # cross-entropy takes int64 targets; Python ints collate to int64
    if labels.dtype != torch.int64 or bool((labels < 0).any()):
        raise UserError(
            f"{where}: its labels must be int64 integers >= 0 (torch.long), got {labels.dtype}; "
            "convert them with .long()"
        )
    height, width = x.shape[1:]
    if height != width:
        raise UserError(f"{where}: its inputs are {height}x{width}; resize them to a square")
    if height != input_size:
        raise UserError(
            f"{where}: its inputs are {height}x{width} px but input_size is {input_size}; "
            f"add --set input_size={height}"
        )
    num_classes = len(classes) if classes is not None else int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise UserError(
            f"{where}: a label is {int(labels.max())} but the training set has "
            f"{num_classes} classes"
        )
    info = DataInfo(path, num_classes, int(x.shape[0]), len(train), len(test))
    return train, test, info


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False
) -> DataLoader:
    """A single-process loader whose shuffle order is fixed by ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )


def load_for(cfg, data_root: str | Path | None = None) -> tuple[Dataset, Dataset, DataInfo]:
    """:func:`load_datasets` with a run config's data settings (``data_root`` may override)."""
    return load_datasets(
        cfg.dataset,
        data_root=cfg.data_root if data_root is None else data_root,
        input_size=cfg.input_size,
        download=cfg.download,
        seed=cfg.seed,
    )
