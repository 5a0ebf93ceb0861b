"""Prune a trained torchvision ResNet-18 to half its MACs, then export it.

The workflow of a model you already have: torchvision's ResNet-18, its stem adapted to
1-channel 16 px digits (scikit-learn's, shipped inside the package, no download), is trained
dense in a plain PyTorch loop and its ``state_dict`` saved to a file. A new instance loads that
file and goes to ``edrop_ray.prune`` with ``target_macs=0.5``: every state the search tries
fits the budget, and the kept weights are fine-tuned from the trained ones. The slimmed model is
then saved, reloaded from the run folder and measured again (MACs at most half the dense
model's), and exported with ``torch.export`` (offline, no ONNX needed), reloaded and checked.

    python examples/prune_trained_torchvision.py                # a few minutes on 2 idle CPUs
    python examples/prune_trained_torchvision.py --tiny         # under a minute (the tests)
    python examples/prune_trained_torchvision.py --out runs/r18 # keep the files there
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import models

import edrop_ray
from edrop_ray.data import load_datasets
from edrop_ray.slim import count_params_macs, load_pruned


def make_resnet18(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 for small grey images: a 3x3 stride-1 stem over ``in_channels``
    instead of the 7x7 stride-2 one over RGB (the max-pool is kept)."""
    model = models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    return model


def train_dense(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """Your own training, before pruning: EDropout starts from the weights it leaves."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def top1(model: nn.Module, test_set: TensorDataset) -> float:
    x, y = test_set.tensors
    model.eval()
    with torch.no_grad():
        return 100 * (model(x).argmax(1) == y).float().mean().item()


def export_model(model: nn.Module, path: Path, x: torch.Tensor) -> nn.Module:
    """``torch.export`` the slimmed model to ``path`` (any batch size, the shape of ``x``
    otherwise) and load it back as a runnable module."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="under a minute: the tests' setting")
    ap.add_argument("--out", default=None, help="folder for the weights, the run and the export")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edrop-example-") as tmp:
        return run(Path(args.out or tmp), tiny=args.tiny, seed=args.seed)


def run(out: Path, *, tiny: bool, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    size = 8 if tiny else 16  # digits are 8x8; 16 px gives the convolutions more room
    train_set, test_set, info = load_datasets("digits", data_root=".", input_size=size)
    if tiny:  # a few batches: the point is the workflow, not the accuracy
        train_set = TensorDataset(*(t[:128] for t in train_set.tensors))
        test_set = TensorDataset(*(t[:64] for t in test_set.tensors))
    loader = DataLoader(train_set, batch_size=64, shuffle=True)

    # 1. train dense and save the weights, as any training script does
    model = make_resnet18(info.num_classes, info.in_channels)
    train_dense(model, loader, epochs=1 if tiny else 5)
    weights = out / "resnet18_digits.pt"
    torch.save(model.state_dict(), weights)
    print(f"dense ResNet-18 trained: Top-1 {top1(model, test_set):.2f}%, saved to {weights}")

    # 2. prune a new instance that starts from the saved weights to at most half the MACs
    trained = make_resnet18(info.num_classes, info.in_channels)
    trained.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    settings = dict(epochs=5, population_size=8, evolve_every=2, patience=10)
    if tiny:
        settings = dict(
            epochs=1, population_size=4, evolve_every=2, max_generations=2, energy_batch_size=16
        )
    result = edrop_ray.prune(
        trained,
        loader,  # its dataset and batch size
        test_set,
        out=out / "run",
        overwrite=True,
        quiet=tiny,
        seed=seed,
        target_macs=0.5,  # every state the search tries keeps at most half of the MACs
        **settings,
    )
    r = result.report
    print(
        f"pruned: Top-1 {r['pruned_top1']:.2f}% (dense run {r['dense_top1']:.2f}%); MACs kept "
        f"{r['macs_pruned']:,} of {r['macs_dense']:,} ({100 * r['macs_kept']:.1f}%)"
    )

    # 3. the slimmed model, saved in the run folder: reload it and measure it again
    x = torch.zeros(1, info.in_channels, size, size)
    slim = load_pruned(out / "run" / "pruned_model.pt", model=make_resnet18(info.num_classes))
    _, dense_macs = count_params_macs(make_resnet18(info.num_classes), x)
    params, macs = count_params_macs(slim, x)
    assert macs <= 0.5 * dense_macs, f"{macs} MACs is over half of the dense {dense_macs}"
    print(f"reloaded: {params:,} parameters, {macs:,} MACs ({100 * macs / dense_macs:.1f}%)")

    # 4. export it for deployment and check that the exported program computes the same logits
    batch = test_set.tensors[0][:8]
    exported = export_model(slim, out / "resnet18_pruned.pt2", batch)
    with torch.no_grad():
        same = torch.allclose(exported(batch), slim(batch), atol=1e-4)
    assert same, "the exported model does not compute what the slimmed one computes"
    print(f"exported with torch.export to {out / 'resnet18_pruned.pt2'}")
    return {"report": r, "macs": macs, "dense_macs": dense_macs, "params": params}


if __name__ == "__main__":
    main()
