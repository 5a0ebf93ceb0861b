"""Tests for edrop_ray.data: in-memory sets, torchvision sets on fabricated files, user errors.

The torchvision sets are read from tiny files written here in each dataset's real on-disk format,
so the tests exercise torchvision's own readers without any download.
"""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edrop_ray.data import DATASETS, DataInfo, load_datasets, make_loader
from edrop_ray.errors import UserError

# The real MNIST test split lives in shared/ beside the repository (CI lays a copy there too).
MNIST_TEST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ---------------------------------------------------------------- fabrication in real formats


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """idx3-ubyte: magic 0x00000803 (uint8, 3 dims), then the big-endian dims, then pixels."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """idx1-ubyte: magic 0x00000801 (uint8, 1 dim), then the count, then one byte per label."""
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def fabricate_mnist_family(root: Path, class_name: str, n_train: int, n_test: int) -> dict:
    """``<root>/<class_name>/raw/{train,t10k}-*-ubyte`` as torchvision expects after download."""
    rng = np.random.default_rng(1)
    raw = root / class_name / "raw"
    raw.mkdir(parents=True)
    labels = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels[prefix] = rng.integers(0, 10, n)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    return {"train": labels["train"].tolist(), "test": labels["t10k"].tolist()}


def write_cifar_pickle(path: Path, entry: dict) -> None:
    # The originals are Python 2 pickles with str keys; torchvision loads them with
    # encoding="latin1" and indexes entry["data"], so str keys are the faithful format.
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def fabricate_cifar10(root: Path, per_batch: int, n_test: int) -> dict:
    """``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``, rows of 3072 uint8."""
    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels: dict[str, list[int]] = {"train": [], "test": []}
    batches = [(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)]
    for name, n, split in [*batches, ("test_batch", n_test, "test")]:
        batch_labels = rng.integers(0, 10, n).tolist()
        labels[split] += batch_labels
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        write_cifar_pickle(folder / name, {"data": data, "labels": batch_labels})
    write_cifar_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return labels


def fabricate_cifar100(root: Path, n_train: int, n_test: int) -> dict:
    """``cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    rng = np.random.default_rng(3)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels[split] = rng.integers(0, 100, n).tolist()
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": labels[split],
            "coarse_labels": [label // 5 for label in labels[split]],
        }
        write_cifar_pickle(folder / split, entry)
    meta = {
        "fine_label_names": [f"f{i}" for i in range(100)],
        "coarse_label_names": [f"c{i}" for i in range(20)],
    }
    write_cifar_pickle(folder / "meta", meta)
    return labels


def fabricate_flowers102(root: Path) -> dict:
    """``flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}``; labels are 1-based."""
    from scipy.io import savemat

    rng = np.random.default_rng(4)
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    n = 10
    for image_id in range(1, n + 1):
        # Odd, non-square sizes, as the real photos: the transform must resize them.
        pixels = rng.integers(0, 256, (40 + image_id, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"image_{image_id:05d}.jpg")
    file_labels = rng.integers(1, 103, n)
    savemat(folder / "imagelabels.mat", {"labels": file_labels.reshape(1, n)})
    split_ids = {"trnid": [1, 4, 7, 9], "valid": [2, 5], "tstid": [3, 6, 8, 10]}
    savemat(folder / "setid.mat", {k: np.array([v]) for k, v in split_ids.items()})
    return {
        split: [int(file_labels[i - 1]) - 1 for i in split_ids[key]]
        for split, key in (("train", "trnid"), ("test", "tstid"))
    }


def fabricate(name: str, root: Path) -> tuple[dict, DataInfo]:
    """Write ``name``'s files under ``root``; return the labels written and the expected info."""
    mnist_classes = {"mnist": "MNIST", "kmnist": "KMNIST", "fashion-mnist": "FashionMNIST"}
    if name in mnist_classes:
        return fabricate_mnist_family(root, mnist_classes[name], 7, 4), DataInfo(name, 10, 1, 7, 4)
    if name == "cifar10":
        return fabricate_cifar10(root, 2, 3), DataInfo(name, 10, 3, 10, 3)
    if name == "cifar100":
        return fabricate_cifar100(root, 6, 4), DataInfo(name, 100, 3, 6, 4)
    return fabricate_flowers102(root), DataInfo(name, 102, 3, 4, 4)


def list_tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_and_sizes() -> None:
    train, test, info = load_datasets("digits", data_root="unused")
    assert info == DataInfo("digits", 10, 1, len(train), len(test))
    assert len(train) + len(test) == 1797
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    labels = torch.cat([train.tensors[1], test.tensors[1]])
    assert set(labels.tolist()) == set(range(10))
    # Normalised with the train part's statistics.
    assert abs(train.tensors[0].mean().item()) < 1e-4
    assert abs(train.tensors[0].std().item() - 1) < 1e-4


def test_digits_split_follows_seed() -> None:
    a, _, _ = load_datasets("digits", data_root="unused", seed=3)
    b, _, _ = load_datasets("digits", data_root="unused", seed=3)
    c, _, _ = load_datasets("digits", data_root="unused", seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])


def test_digits_input_size() -> None:
    train, test, _ = load_datasets("digits", data_root="unused", input_size=8)
    assert train[0][0].shape == (1, 8, 8) and test[0][0].shape == (1, 8, 8)


# --------------------------------------------------------------------------- mnist-test-split


@pytest.mark.skipif(not MNIST_TEST_ROOT.is_dir(), reason="no MNIST test split in ../shared")
def test_mnist_test_split_real_files() -> None:
    before = list_tree(MNIST_TEST_ROOT)
    train, test, info = load_datasets("mnist-test-split", data_root=MNIST_TEST_ROOT, seed=0)
    assert info == DataInfo("mnist-test-split", 10, 1, 8000, 2000)
    assert train[0][0].shape == (1, 32, 32)
    labels = torch.cat([train.tensors[1], test.tensors[1]])
    assert labels.dtype == torch.int64 and labels.min() == 0 and labels.max() == 9
    assert list_tree(MNIST_TEST_ROOT) == before  # read-only, shared: nothing written


def test_mnist_test_split_accepts_uncompressed_files(tmp_path: Path) -> None:
    fabricate_mnist_family(tmp_path, "MNIST", 3, 20)  # only the t10k files are used
    train, test, info = load_datasets("mnist-test-split", data_root=tmp_path, input_size=28)
    assert (info.train_size, info.test_size) == (16, 4)
    assert train[0][0].shape == (1, 28, 28)


def test_mnist_test_split_corrupt_file(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz is not a readable"):
        load_datasets("mnist-test-split", data_root=tmp_path)


def test_mnist_test_split_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        load_datasets("mnist-test-split", data_root=tmp_path)


# ------------------------------------------------------------ torchvision sets, fabricated files


@pytest.mark.parametrize(
    "name", ["mnist", "kmnist", "fashion-mnist", "cifar10", "cifar100", "flowers102"]
)
def test_torchvision_set_reads_fabricated_files(name: str, tmp_path: Path) -> None:
    labels, expected = fabricate(name, tmp_path)
    train, test, info = load_datasets(name, data_root=str(tmp_path), input_size=16)
    assert info == expected
    for dataset, split in ((train, "train"), (test, "test")):
        assert len(dataset) == len(labels[split])
        items = [dataset[i] for i in range(len(dataset))]
        for image, label in items:
            assert image.shape == (info.in_channels, 16, 16) and image.dtype == torch.float32
            assert label.dtype == torch.int64
        assert [int(label) for _, label in items] == labels[split]


def test_torchvision_sets_pickle(tmp_path: Path) -> None:
    # Ray ships datasets to workers by pickling them: no lambdas in transforms.
    fabricate_cifar10(tmp_path, 2, 3)
    train, _, _ = load_datasets("cifar10", data_root=tmp_path, input_size=8)
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(copy[3][0], train[3][0]) and copy[3][1] == train[3][1]


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("kmnist", "KMNIST/raw/t10k-labels-idx1-ubyte"),
        ("fashion-mnist", "FashionMNIST/raw/train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/meta"),
        ("flowers102", "flowers-102/jpg/"),
    ],
)
def test_missing_files_name_the_file_and_download(name: str, missing: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="download") as caught:
        load_datasets(name, data_root=tmp_path, download=False)
    assert missing in str(caught.value) and str(tmp_path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_one_missing_file_is_named_alone(tmp_path: Path) -> None:
    fabricate_cifar10(tmp_path, 2, 3)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing cifar-10-batches-py/data_batch_3 under"):
        load_datasets("cifar10", data_root=tmp_path)


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    import torchvision.datasets.mnist

    def refuse(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)
    with pytest.raises(UserError, match="download .* failed"):
        load_datasets("mnist", data_root=tmp_path, download=True)


# ------------------------------------------------------------------------------- other errors


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError, match="unknown dataset 'imagenet'") as caught:
        load_datasets("imagenet", data_root="unused")
    assert all(name in str(caught.value) for name in DATASETS)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_input_size(size: object) -> None:
    with pytest.raises(UserError, match="input_size"):
        load_datasets("digits", data_root="unused", input_size=size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ loaders


def test_make_loader_is_reproducible() -> None:
    train, _, _ = load_datasets("digits", data_root="unused", input_size=8)

    def first_labels(seed: int) -> list[int]:
        loader = make_loader(train, batch_size=64, shuffle=True, seed=seed)
        return next(iter(loader))[1].tolist()

    assert first_labels(5) == first_labels(5)
    assert first_labels(5) != first_labels(6)
    batches = list(make_loader(train, batch_size=100, shuffle=False, seed=0, drop_last=True))
    assert len(batches) == len(train) // 100


def test_make_loader_rejects_bad_batch_size() -> None:
    train, _, _ = load_datasets("digits", data_root="unused", input_size=8)
    with pytest.raises(UserError, match="batch_size"):
        make_loader(train, batch_size=0, shuffle=False, seed=0)
