"""``edrop-ray sweep``: space validation, a trial's checkpoint resume, a 2-trial Tune sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray import tune

from edrop_ray import store
from edrop_ray.cli import main
from edrop_ray.config import config_to_dict, load_config
from edrop_ray.errors import UserError
from edrop_ray.space import check_space, load_space, to_param_space
from edrop_ray.tune import MASK_FILE, edropout_trial, trial_resources

pytestmark = pytest.mark.ray
SHARED_RAY = True  # the sweep attaches to the session's Ray instance (conftest.ray_cluster)
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SPACE_TINY = ROOT / "configs" / "space_tiny.yaml"
SPACE_DEFAULT = ROOT / "configs" / "space_default.yaml"


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def sweep_args(space: Path, out: Path, samples: int = 2) -> list[str]:
    return ["sweep", "--config", str(TINY), "--space", str(space), "--samples", str(samples),
            "--out", str(out), "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochz: {choice: [1, 2]}", "'epochz' is not a config key; searchable keys: population_"),
        ("dataset: {choice: [digits]}", "'dataset' is not searchable"),
        ("", "search space is empty"),
        ("{}", "search space is empty"),
        ("F: {normal: [0, 1]}", "unknown distribution 'normal'"),
        ("F: {uniform: [0, 2]}", "F value 2 is invalid: F must be in [0, 1]"),
        ("F: 0.5", "F: expected {choice: [..]}"),
        ("CR: {uniform: [0.9, 0.1]}", "lo < hi"),
        ("lr: {loguniform: [0, 0.1]}", "loguniform needs 0 < lo"),
        ("population_size: {uniform: [4, 8]}", "use randint or choice"),
        ("population_size: {randint: [2, 8]}", "population_size must be >= 4"),
        ("mutation: [logical, bogus]", "mutation must be one of logical, sigmoid"),
        ("target_prune_rate: {choice: []}", "non-empty list"),
        ("- F", "must hold a mapping"),
    ],
)
def test_bad_space_is_refused_before_anything(tmp_path, capsys, text, expected):
    space = tmp_path / "space.yaml"
    space.write_text(text + "\n")
    out = tmp_path / "out"
    assert main(sweep_args(space, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("edrop-ray: error: ")
    assert err.count("\n") == 1, err
    assert expected in err
    assert not out.exists()


def test_bad_samples_and_missing_space(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(sweep_args(SPACE_TINY, out, samples=0)) == 2
    assert "--samples must be a positive integer" in capsys.readouterr().err
    assert main(sweep_args(tmp_path / "nope.yaml", out)) == 2
    assert "space file" in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_not_a_sweep_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    assert main(sweep_args(SPACE_TINY, out)) == 2
    assert "is not a sweep folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]


def test_shipped_spaces_and_their_tune_domains():
    base = load_config(TINY)
    for path in (SPACE_TINY, SPACE_DEFAULT):
        assert to_param_space(check_space(load_space(path), base))
    space = to_param_space(check_space(
        {"evolve_every": {"randint": [1, 3]}, "mutation": ["logical", "sigmoid"],
         "target_prune_rate": {"choice": [None, 0.5]}, "lr": {"loguniform": [0.01, 0.1]}},
        base,
    ))  # fmt: skip
    assert (space["evolve_every"].lower, space["evolve_every"].upper) == (1, 4)  # both ends in
    assert space["mutation"] == {"grid_search": ["logical", "sigmoid"]}
    assert space["target_prune_rate"].categories == [None, 0.5]
    assert space["lr"].lower == 0.01


def test_trial_resources_one_bundle():
    cfg = load_config(TINY)
    assert trial_resources(cfg, {"CPU": 2}).bundles == [{"CPU": 1.0}]
    assert trial_resources(cfg, {"CPU": 8, "GPU": 1}).bundles == [{"CPU": 1.0, "GPU": 0.5}]
    fixed = load_config(TINY, ["trainer_cpus=2", "trainer_gpus=0", "backend=ray"])
    assert trial_resources(fixed, {"CPU": 8, "GPU": 4}).bundles == [{"CPU": 2.0}]


def test_trial_resumes_from_its_checkpoint(tmp_path, monkeypatch, keep_threads):
    """The trainable in process, with tune.report/get_checkpoint stubbed: a trial restarted
    from a mid-run checkpoint (a folder holding the run's checkpoint.pt, as ``edrop-ray prune``
    writes it) reports the remaining generations and ends where an unbroken trial ends (same
    mask, same Top-1)."""
    base = config_to_dict(load_config(TINY, ["cpu_threads=1"]))
    params = {"F": 0.8, "CR": 0.6}
    saved = iter(range(1000))

    def run(start: tune.Checkpoint | None) -> list[tuple[dict, Path | None]]:
        reports: list[tuple[dict, Path | None]] = []

        def report(metrics, *, checkpoint=None):
            copy = None
            if checkpoint is not None:
                copy = Path(checkpoint.to_directory(str(tmp_path / f"ckpt{next(saved)}")))
            reports.append((dict(metrics), copy))

        monkeypatch.setattr(tune, "report", report)
        monkeypatch.setattr(tune, "get_checkpoint", lambda: start)
        edropout_trial(params, base=base)
        return reports

    full = run(None)
    gens = [m for m, c in full if c is None]  # one report per generation, no checkpoint
    assert [m["generation"] for m in gens] == list(range(1, len(gens) + 1))
    mids = [(i, c) for i, (m, c) in enumerate(full[:-1]) if c is not None]
    assert mids, "tiny.yaml checkpoints every 2 generations' worth of steps"
    for _i, c in mids:  # the run's own checkpoint, loaded as resume loads it
        assert store.load_checkpoint(c)["format"] == store.CHECKPOINT_FORMAT
    i, mid = mids[len(mids) // 2]
    resumed = run(tune.Checkpoint.from_directory(str(mid)))
    rest = full[i + 1 : -1]
    assert [m["generation"] for m, _ in resumed[:-1]] == [m["generation"] for m, _ in rest]
    assert resumed[0][0]["step"] > full[i][0]["step"]
    final, final_ckpt = full[-1]
    again, again_ckpt = resumed[-1]
    for key in ("top1", "top5", "prune_rate", "params_pruned", "step", "generation"):
        assert again[key] == final[key], key
    mask = torch.load(final_ckpt / MASK_FILE, weights_only=True)["mask"]
    assert torch.equal(torch.load(again_ckpt / MASK_FILE, weights_only=True)["mask"], mask)


def test_sweep_end_to_end_and_resume(ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(SPACE_TINY, out)) == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = data["trials"]
    assert len(rows) == 2 and data["scheduler"] == "fifo"  # 2 trials: nothing for ASHA to cut
    for r in rows:
        assert r["status"] == "finished", r
        assert set(r["params"]) == {"F", "CR", "sparsity_lambda"}
        assert 0.5 <= r["params"]["F"] <= 0.95 and r["params"]["sparsity_lambda"] in (0.0, 0.5)
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        assert 0.0 <= r["prune_rate"] < 1.0
        assert 0 < r["params_pruned"] <= r["params_dense"]
    assert rows[0]["top1"] >= rows[1]["top1"]  # best Top-1 first
    assert any(r["pareto"] for r in rows)
    assert (out / "tune").is_dir() and tune.Tuner.can_restore(str(out / "tune"))
    assert (out / "sweep.md").read_text().count("| finished |") == 2

    # The same sweep again on the same folder: Tuner.restore keeps the finished trials.
    assert main(sweep_args(SPACE_TINY, out)) == 0
    again = json.loads((out / "sweep.json").read_text())["trials"]
    assert [(r["trial_id"], r["top1"]) for r in again] == [(r["trial_id"], r["top1"]) for r in rows]

    # Another --samples on the same folder cannot resume it: refused, nothing touched.
    before = (out / "sweep.json").read_bytes()
    assert main(sweep_args(SPACE_TINY, out, samples=3)) == 2
    assert "another config, space or --samples" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == before


def test_check_space_library_errors():
    base = load_config(TINY)
    with pytest.raises(UserError, match="searchable keys"):
        check_space({"nope": [1]}, base)
    with pytest.raises(UserError, match="empty"):
        check_space({}, base)
