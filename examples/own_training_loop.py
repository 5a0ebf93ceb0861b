"""EDropout inside your own training loop, on your own network.

A small CNN with a depthwise convolution and a channel concatenation is trained on scikit-learn's
digits (shipped inside the package, no download). The loop is plain PyTorch; EDropout only
proposes pruning states, judges them, and masks the model while it trains. At the end the
network is physically slimmed.

    python examples/own_training_loop.py            # about a minute on 2 CPUs
    python examples/own_training_loop.py --steps 40 # shorter
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from edrop_ray import EDropout


class TwoBranchNet(nn.Module):
    """conv -> (depthwise 3x3 | pointwise 1x1) concatenated -> conv -> pool -> linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.depthwise(x), self.pointwise(x)], dim=1)
        x = self.mix(x)
        return self.head(x.mean(dim=(2, 3)))


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.seed)
    model = TwoBranchNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ed = EDropout(model, x_train[:2], population_size=args.population, seed=args.seed, patience=8)
    g = torch.Generator().manual_seed(args.seed + 1)

    for step in range(args.steps):
        idx = torch.randint(len(y_train), (64,), generator=g)
        if not ed.frozen and step % 2 == 0:  # one generation every second step
            e_idx = torch.randint(len(y_train), (32,), generator=g)
            candidates = ed.propose()
            ed.tell(ed.energies(candidates, x_train[e_idx], y_train[e_idx]))
        with ed.apply(model, ed.best):  # train the kept weights under the best state
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    with ed.apply(model, ed.best):
        masked = accuracy(model, x_test, y_test)
    slim = ed.slim()
    result = {
        "masked_top1": masked,
        "slim_top1": accuracy(slim, x_test, y_test),
        "prune_rate": ed.prune_rate(),
        "generations": float(ed.generation),
        "kept_units": float(ed.best.sum()),
        "num_units": float(ed.num_units),
    }
    print(
        f"generations {ed.generation}, frozen {ed.frozen}: kept {int(ed.best.sum())} of "
        f"{ed.num_units} units, {100 * result['prune_rate']:.1f}% of parameters removed; "
        f"Top-1 masked {masked:.2f}%, slimmed {result['slim_top1']:.2f}%"
    )
    return result


if __name__ == "__main__":
    main()
