"""Prune your own network with one call: ``edrop_ray.prune``.

A custom CNN (a depthwise 3x3 convolution and a 1x1 branch joined by ``torch.cat``) is trained
for a few epochs in a plain PyTorch loop on scikit-learn's digits (shipped inside the package,
no download), then handed to ``edrop_ray.prune`` with the weights it learned: EDropout searches
the channels to drop, fine-tunes the kept weights, and returns the physically slimmed network.

    python examples/prune_custom_cnn.py                 # about 50 s on 2 idle CPUs
    python examples/prune_custom_cnn.py --tiny          # a few seconds (the tests run this)
    python examples/prune_custom_cnn.py --out runs/cnn  # also keep the run folder
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import edrop_ray
from edrop_ray.data import load_datasets


class ConcatDepthwiseNet(nn.Module):
    """stem -> (depthwise 3x3 | pointwise 1x1) concatenated -> conv -> pool -> MLP head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.depthwise = nn.Sequential(  # groups = channels: tied to the stem's channels
            nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.mix = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Linear(2 * w, 2 * w), nn.ReLU(), nn.Linear(2 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.depthwise(x), self.pointwise(x)], dim=1)
        x = self.mix(x)
        return self.head(x.mean(dim=(2, 3)))


def pretrain(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """Your own training, before pruning: EDropout starts from the weights it leaves."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def main(argv: list[str] | None = None) -> edrop_ray.PruneResult:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few seconds: the tests' setting")
    ap.add_argument("--out", default=None, help="keep the run folder there")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    size = 8 if args.tiny else 16  # digits are 8x8; 16 px gives the convolutions more room
    train_set, test_set, _info = load_datasets("digits", data_root=".", input_size=size)
    model = ConcatDepthwiseNet(width=8 if args.tiny else 16)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    pretrain(model, loader, epochs=1 if args.tiny else 5)

    settings = dict(epochs=1, population_size=4, evolve_every=2, patience=5, energy_batch_size=16)
    if not args.tiny:
        settings = dict(epochs=5, population_size=8, evolve_every=2, patience=10)
    result = edrop_ray.prune(
        model,
        loader,  # its dataset and batch size
        test_set,
        out=args.out,
        quiet=args.tiny,
        seed=args.seed,
        target_params=0.5,  # keep at most half of the parameters
        **settings,
    )
    r = result.report
    print(
        f"Top-1 dense {r['dense_top1']:.2f}% vs pruned {r['pruned_top1']:.2f}%; params kept "
        f"{r['params_pruned']:,} of {r['params_dense']:,} ({100 * r['params_kept']:.1f}%), "
        f"{r['kept_units']} of {r['num_units']} channels, {r['generations']} generations"
    )
    with torch.no_grad():  # the slimmed network is a plain nn.Module, ready to use
        x, y = test_set.tensors
        top1 = (result.model(x).argmax(1) == y).float().mean().item()
    print(f"slimmed model on the test set: Top-1 {100 * top1:.2f}%")
    return result


if __name__ == "__main__":
    main()
