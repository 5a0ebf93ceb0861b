"""`edrop-ray compare`: EDropout against dense, group-L1 magnitude and random pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from edrop_ray.arms import DEFAULT_ARMS, finetune_budget
from edrop_ray.baselines import fit_param_count, group_l1_scores, prune_order
from edrop_ray.cli import main
from edrop_ray.report import seeds_markdown
from edrop_ray.seed_stats import summarize_seeds
from edrop_ray.slim import slim_model
from edrop_ray.units import discover_units

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# One torch thread: on a shared 2-core box two threads spin against other work and run ~10x
# slower. Three generations then a freeze leave EDropout 18 of its 22 steps with its final mask.
# S = 6 so that the edropout-s4 arm is a different search from the edropout arm.
FAST = ["--set", "backend=local", "--set", "cpu_threads=1", "--set", "max_generations=3",
        "--set", "population_size=6"]  # fmt: skip
OUTPUTS = ("compare.json", "compare.md", "accuracy_vs_params.png")
PARAM_TOLERANCE = 0.01  # |params / EDropout's - 1| of the baselines (one unit is ~0.05 % here)


def _run_counting(argv: list[str]) -> list[int]:
    """Run ``edrop-ray`` with ``argv``; the optimiser steps each optimiser really took, in the
    order the optimisers first stepped (counted here, by a hook of the test's own)."""
    counts: list[int] = []

    def hook(optimizer, _args, _kwargs) -> None:
        tag = getattr(optimizer, "_test_tag", None)
        if tag is None:
            tag = optimizer._test_tag = len(counts)
            counts.append(0)
        counts[tag] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return counts


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    counts = _run_counting(["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet"])
    return out, json.loads((out / "compare.json").read_text()), counts


def _row(result, method):
    return next(r for r in result["rows"] if r["method"] == method)


def test_writes_json_markdown_and_plot_with_a_row_per_arm(comparison):
    out, result, _ = comparison
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert [r["method"] for r in result["rows"]] == list(DEFAULT_ARMS)
    assert (out / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(DEFAULT_ARMS)  # header, rule, one line per method
    assert all(m in "\n".join(table) for m in DEFAULT_ARMS)
    for r in result["rows"]:
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        assert r["params"] > 0 and r["macs"] > 0 and r["wall_s"] > 0
    # the EDropout row is the EDropout run's own report, kept beside the comparison
    report = json.loads((out / "edropout" / "report.json").read_text())
    edrop = _row(result, "edropout")
    assert edrop["params"] == report["params_pruned"] == result["target_params"]
    assert edrop["top1"] == report["pruned_top1"]
    assert _row(result, "dense")["params"] == report["params_dense"] == result["params_dense"]


def test_baselines_are_pruned_to_edropouts_parameter_count(comparison):
    _, result, _ = comparison
    target = result["target_params"]
    dense = result["params_dense"]
    assert target < dense  # EDropout did prune, so the baselines had something to match
    for method in ("magnitude", "random", "random-mask"):
        r = _row(result, method)
        assert abs(r["params"] / target - 1) <= PARAM_TOLERANCE, (method, r["params"], target)
        assert r["params_vs_edropout"] == pytest.approx(r["params"] / target - 1)
    for r in result["rows"]:
        assert 0.0 <= r["prune_rate"] < 1.0
        assert r["prune_rate"] == pytest.approx(1 - r["params"] / dense)
    assert _row(result, "dense")["prune_rate"] == 0.0


def test_every_arm_trains_the_steps_it_reports_and_all_train_equally(comparison):
    out, result, counts = comparison
    history = pq.read_table(out / "edropout" / "history.parquet").to_pylist()
    assert len(history) == 3 and history[-1]["frozen"]  # max_generations=3 froze it
    # optimisers in the order compare steps them: dense, EDropout, the dense model the pruning
    # baselines start from, magnitude's and random's fine-tuning, random-mask, S = 4, first gen
    assert len(counts) == 8, counts
    dense, edrop, pre, magnitude, random, random_mask, s4, first_gen = counts
    assert dense == result["total_steps"] == 22  # 1 epoch of the tiny digits split
    assert [edrop, random_mask, s4, first_gen] == [dense] * 4
    assert pre + magnitude == pre + random == dense  # equal-steps: T - f dense, then f
    # the baselines fine-tune exactly the steps EDropout trained after its last generation
    assert magnitude == random == dense - (history[-1]["step"] - 1) > 0
    reported = {r["method"]: r["train_steps"] for r in result["rows"]}
    assert reported == {
        "dense": dense, "edropout": edrop, "magnitude": pre + magnitude, "random": pre + random,
        "random-mask": random_mask, "edropout-s4": s4, "frozen-first-gen": first_gen,
    }  # fmt: skip
    assert all(r["steps_counted"] for r in result["rows"])
    assert _row(result, "magnitude")["finetune_steps"] == magnitude
    assert result["budget"] == "equal-steps"
    assert "equal-steps" in (out / "compare.md").read_text()
    # the controls are what they say: S = 4, and a single generation
    s4_cfg = (out / "edropout-s4" / "config.yaml").read_text()
    assert "population_size: 4" in s4_cfg
    assert len(pq.read_table(out / "frozen-first-gen" / "history.parquet")) == 1


def test_equal_finetune_gives_the_baselines_the_whole_dense_budget_too(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet",
            "--budget", "equal-finetune", "--arms", "magnitude"]  # fmt: skip
    counts = _run_counting(argv)
    result = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["dense", "edropout", "magnitude"]
    dense, edrop, magnitude = counts  # no second dense model: magnitude prunes the dense arm's
    assert dense == edrop == result["total_steps"]
    assert _row(result, "magnitude")["train_steps"] == dense + magnitude
    assert 0 < magnitude < dense
    assert "equal-finetune" in (out / "compare.md").read_text()


def test_the_paper_schedule_arm_evolves_at_every_step_with_16_members(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet",
            "--arms", "paper-schedule"]  # fmt: skip
    counts = _run_counting(argv)
    result = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["dense", "edropout", "paper-schedule"]
    dense, edrop, paper = counts
    assert dense == edrop == paper == result["total_steps"]
    assert _row(result, "paper-schedule")["train_steps"] == paper
    cfg = (out / "paper-schedule" / "config.yaml").read_text()
    assert "population_size: 16" in cfg and "evolve_every: 1" in cfg
    steps = [
        r["step"] for r in pq.read_table(out / "paper-schedule" / "history.parquet").to_pylist()
    ]
    assert len(steps) == 3  # max_generations=3 of FAST
    assert steps == list(range(steps[0], steps[0] + 3))  # a generation at every step


def test_seeds_run_in_separate_processes_then_one_summary(tmp_path):
    """compare --seeds N --reuse per process (as results/run_compare.sh runs them), then one
    --reuse call over all the seeds summarises without running anything again."""
    out = tmp_path / "cmp"
    base = ["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet", "--arms", "dense"]
    for seed in ("0", "1"):
        assert main([*base, "--seeds", seed, "--reuse"]) == 0
    assert _run_counting([*base, "--seeds", "0,1", "--reuse"]) == []  # nothing trained again
    summary = json.loads((out / "compare.json").read_text())
    assert [a["method"] for a in summary["arms"]] == ["dense", "edropout"]
    assert all(len(a["top1"]) == 2 for a in summary["arms"])
    assert (out / ".edrop_ray_run").is_file()  # the folder is marked as this tool's
    # --overwrite may replace the whole multi-seed comparison: only this tool's files are in it
    from edrop_ray import store

    store.check_out(out, overwrite=True, kind="compare")
    # a file of the user's in the folder: refused, nothing touched
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    assert main([*base, "--seeds", "0,1", "--reuse"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "notes.txt").read_text() == "mine"


def test_dynamics_are_recorded_per_generation(comparison):
    out, result, _ = comparison
    history = pq.read_table(out / "edropout" / "history.parquet").to_pylist()
    masks = [torch.ones(result["num_units"], dtype=torch.bool)]  # the initial best: member 0
    for row in history:
        assert row["energy_gap"] == pytest.approx(row["median_energy"] - row["best_energy"])
        assert row["energy_gap"] >= 0  # the best member is never worse than the median one
    final = torch.load(out / "edropout" / "mask.pt", weights_only=True)["mask"]
    masks.append(final)
    # the bits changed over all generations are at least the distance from start to the end
    assert sum(r["best_changed_bits"] for r in history) >= int((masks[0] != masks[1]).sum()) > 0
    for name in ("energy_gap", "best_changed_bits", "train_loss"):
        assert (out / "edropout" / "plots" / f"{name}.png").is_file(), name


def _fake_seed(seed: int, top1: dict[str, float]) -> dict:
    rows = [{"method": m, "top1": t, "top5": 100.0, "params": 10, "prune_rate": 0.5,
             "train_steps": 7} for m, t in top1.items()]  # fmt: skip
    return {"seed": seed, "dataset": "d", "model": "m", "backend": "local", "budget": "equal-steps",
            "total_steps": 7, "finetune_steps": 3, "params_dense": 20, "target_params": 10,
            "rows": rows, "config": {"seed": seed}}  # fmt: skip


def test_seed_summary_mean_std_and_the_spread_rule():
    per_seed = [
        _fake_seed(0, {"edropout": 90.0, "a": 80.0, "b": 89.0, "c": 95.0}),
        _fake_seed(1, {"edropout": 92.0, "a": 81.0, "b": 93.0, "c": 96.0}),
        _fake_seed(2, {"edropout": 94.0, "a": 82.0, "b": 91.0, "c": 97.0}),
    ]
    summary = summarize_seeds(per_seed)
    arm = {a["method"]: a for a in summary["arms"]}
    assert arm["edropout"]["top1_mean"] == pytest.approx(92.0)
    assert arm["edropout"]["top1_sd"] == pytest.approx(2.0)  # sample std (n - 1)
    lead = {x["method"]: x for x in summary["leads"]}
    assert lead["a"]["lead_mean"] == pytest.approx(11.0)
    assert lead["a"]["verdict"] == "EDropout ahead"  # 11 > max(sd(d)=1, 2, 1)
    assert lead["b"]["lead_mean"] == pytest.approx(1.0)
    assert lead["b"]["verdict"] == "within the spread"  # 1 < sd of b (2)
    assert lead["c"]["verdict"] == "EDropout behind"  # -4 > 2 in size
    table = seeds_markdown(summary)
    assert "92.00 ± 2.00" in table and "EDropout behind" in table
    one = summarize_seeds(per_seed[:1])
    assert {x["verdict"] for x in one["leads"]} == {"one seed: no spread"}


def test_second_run_into_the_same_out_is_refused_and_changes_nothing(comparison, capsys):
    out, _, _ = comparison
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "already holds a comparison" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_folder_with_an_unfinished_comparison_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "edropout").mkdir(parents=True)
    (out / "edropout" / "config.yaml").write_text("seed: 0\n")
    assert main(["compare", "--config", TINY, *FAST, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unfinished comparison" in err and "--overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == ["config.yaml", "edropout"]


def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--config", TINY, "--set", "F=2", "--out", str(out), "--quiet"]) == 2
    assert "F must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- ranking


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


@torch.no_grad()
def _zero_channel(conv: nn.Conv2d, bn: nn.BatchNorm2d, consumer: nn.Module, c: int) -> None:
    conv.weight[c] = 0
    conv.bias[c] = 0
    bn.weight[c] = 0
    bn.bias[c] = 0
    consumer.weight[:, c] = 0


def test_group_l1_ranking_prunes_the_smallest_norm_units_first():
    model = _tiny_model()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    group = {g.root: g for g in units.groups}
    assert set(group) == {"0", "3"}
    a, b = group["0"].offset, group["3"].offset
    _zero_channel(model[0], model[1], model[3], 2)
    _zero_channel(model[0], model[1], model[3], 5)
    _zero_channel(model[3], model[4], model[8], 1)
    with torch.no_grad():  # small, but not zero: next in line
        model[3].weight[4] *= 0.01
        model[4].weight[4] *= 0.01
        model[8].weight[:, 4] *= 0.01
    zeroed = {a + 2, a + 5, b + 1}

    scores = group_l1_scores(model, units, x)
    assert {int(u) for u in (scores == 0).nonzero()} == zeroed
    order = prune_order(scores, units)
    assert {int(u) for u in order[:3]} == zeroed
    assert int(order[3]) == b + 4
    assert order.numel() == units.num_units - len(units.groups)  # each group keeps its best

    # the budget of exactly those three units gone is met by removing exactly those three
    state = torch.ones(units.num_units, dtype=torch.bool)
    state[list(zeroed)] = False
    target = sum(p.numel() for p in slim_model(model, units, state, x).parameters())
    fitted, params = fit_param_count(model, units, order, x, target)
    assert params == target
    assert {int(u) for u in (~fitted).nonzero()} == zeroed


def test_prune_order_never_removes_a_whole_group():
    model = _tiny_model()
    x = torch.randn(2, 1, 8, 8)
    units = discover_units(model, x)
    order = prune_order(torch.rand(units.num_units), units)
    fitted, params = fit_param_count(model, units, order, x, target=0)  # below any reachable count
    assert params > 0
    for g in units.groups:
        assert int(fitted[g.offset : g.offset + g.size].sum()) == 1


def test_finetune_budget_rule():
    # frozen (or last) generation's row: step counted after its training step
    assert finetune_budget([{"step": 1}, {"step": 3}, {"step": 5}], 22) == (4, 18)
    assert finetune_budget([{"step": 21}], 22) == (20, 2)  # never froze: after the last generation
    assert finetune_budget([], 22) == (0, 22)
