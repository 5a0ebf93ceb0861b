"""How much search does binary DE do? Planted optima, against random search at equal evaluations.

The energy of a state is its Hamming distance to a hidden state (``separable``), or that distance
counted on pairs of bits that must both match (``paired``: bit 2k and 2k+1 score together, so
single flips are not always rewarded). Each DE setting evolves S members for G generations
(2S energies per generation, as in EDropout); random search draws the same number of uniform
states. The table gives the mean (min-max) distance of the best state from the optimum over
seeds: 0 means found. No network is involved; this isolates the evolutionary operator.

    python benchmarks/bench_operators.py            # writes benchmarks/results/operators.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import add_common_args, csv

from edrop_ray.search import DEParams, Search

SETTINGS = [  # (mutation, F, CR); the first is the paper's and the default
    ("logical", 0.9, 0.7),
    ("logical", 0.5, 0.5),
    ("logical", 0.5, 0.3),
    ("logical", 0.2, 0.2),
    ("logical", 0.1, 0.1),
    ("sigmoid", 0.9, 0.7),
    ("sigmoid", 0.5, 0.3),
]


def energy(kind: str, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    wrong = states != target
    if kind == "separable":
        return wrong.sum(dim=1).float()
    pairs = wrong.view(states.shape[0], -1, 2).any(dim=2)  # a pair scores only when both match
    return pairs.sum(dim=1).float()


def de_distance(kind, mutation, F, CR, *, d, size, generations, seed, target) -> int:
    params = DEParams(
        population_size=size, mutation=mutation, F=F, CR=CR, seed=seed, patience=10**9
    )
    search = Search(params, d)
    for _ in range(generations):
        candidates = search.propose()
        search.select(energy(kind, candidates, target))
    return int(energy(kind, search.best[None], target)[0])


def random_distance(kind, *, d, evaluations, seed, target) -> int:
    g = torch.Generator().manual_seed(10_000 + seed)
    states = torch.rand(evaluations, d, generator=g) < 0.5
    return int(energy(kind, states, target).min())


def summary(values: list[int]) -> str:
    return f"{statistics.mean(values):.1f} ({min(values)}-{max(values)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--units", type=csv(int), default=[64, 512])
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=150)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "operators.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    lines = [
        "# Binary DE on planted optima (benchmarks/bench_operators.py)",
        "",
        f"S = {args.population}, G = {args.generations} generations "
        f"({2 * args.population * args.generations} energies), {args.seeds} seeds; "
        "distance of the best state from the optimum, mean (min-max); 0 = found.",
        "",
    ]
    for kind in ("separable", "paired"):
        header = "| search | " + " | ".join(f"D = {d}" for d in args.units) + " |"
        lines += [f"## {kind}", "", header, "|---" * (len(args.units) + 1) + "|"]
        rows: dict[str, list[str]] = {}
        for d in args.units:
            targets = [
                torch.rand(d, generator=torch.Generator().manual_seed(s)) < 0.5
                for s in range(args.seeds)
            ]
            for mutation, F, CR in SETTINGS:
                vals = [
                    de_distance(kind, mutation, F, CR, d=d, size=args.population,
                                generations=args.generations, seed=s, target=targets[s])
                    for s in range(args.seeds)
                ]  # fmt: skip
                rows.setdefault(f"DE {mutation} F={F} CR={CR}", []).append(summary(vals))
            evals = 2 * args.population * args.generations
            vals = [
                random_distance(kind, d=d, evaluations=evals, seed=s, target=targets[s])
                for s in range(args.seeds)
            ]
            rows.setdefault("random search", []).append(summary(vals))
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
