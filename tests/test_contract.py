"""The input contract, as a user meets it: bad input of every kind, on every verb, ends in exit
status 2, exactly one line on stderr, no traceback, and the disk exactly as it was.

Each case runs ``python -m edrop_ray ...`` in a subprocess, in a folder of its own that holds a
finished run (``run/``), a folder of the user's own files (``user/``) and whatever the case adds;
every file there (bytes and mode) and every folder name is compared before and after. The cases
run a few at a time (most fail before torch is imported); one real tiny run is built once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from edrop_ray import job, store
from edrop_ray.cli import main
from edrop_ray.config import Config, config_to_dict
from edrop_ray.errors import RunInterrupted, UserError
from edrop_ray.seeds import STREAMS_VERSION

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# tiny.yaml made smaller still: a finished run in seconds (5 steps of 256 images at 8 px)
FAST = ["--set", "input_size=8", "--set", "batch_size=256", "--set", "eval_batch_size=512",
        "--set", "energy_batch_size=8"]  # fmt: skip
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One real finished run of this version (built in process, once)."""
    out = tmp_path_factory.mktemp("fixture") / "run"
    code = main(["prune", "--config", TINY, "--backend", "local", "--out", str(out), "--quiet",
                 *FAST])  # fmt: skip
    assert code == 0
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: files by content and mode, folders by name."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a new file (the fixture's files are hard links: never write into them)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


# --------------------------------------------------------------------------- the corpus


def _binary(d: Path) -> None:
    replace_file(d / "bad.yaml", bytes(range(256)) * 4)


def _alias_bomb(d: Path) -> None:
    """A billion laughs under a real key: nine levels of nine references each."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [{','.join(['*' + prev] * 9)}]")
    replace_file(d / "bomb.yaml", "lr: [" + ", ".join(levels) + "]\n")


def _edit_config(d: Path, text: str) -> None:
    replace_file(d / "bad.yaml", text)


def _fake_checkpoint(
    d: Path, config: dict, on_disk: dict | None = None, streams: int = STREAMS_VERSION
) -> None:
    """run2/: an unfinished run whose checkpoint holds ``config``."""
    run = d / "run2"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(on_disk if on_disk is not None else config))
    blob = {"format": store.CHECKPOINT_FORMAT, "streams": streams, "config": config,
            "learner": {}, "search": {}, "history": [], "snapshots": [], "wall_s": 0.0}  # fmt: skip
    torch.save(blob, run / "checkpoint.pt")


def _tiny_config() -> dict:
    return config_to_dict(Config(**yaml.safe_load(Path(TINY).read_text())))


def _garbage_mnist(d: Path) -> None:
    raw = d / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (raw / name).write_bytes(b"\x00\x00\x08\x03 this is not MNIST" * 3)


def _read_only(d: Path) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)


def _compare_folder(d: Path) -> None:
    """cmp/: a comparison (compare.json) whose EDropout arm is a copy of the finished run."""
    shutil.copytree(d / "run", d / "cmp" / "edropout", copy_function=os.link)
    (d / "cmp" / "compare.json").write_text(json.dumps({"format": "edrop_ray.compare/1"}))


@dataclass
class Case:
    name: str
    argv: list[str]  # {run}, {user}, {d} (the case's folder) and {tiny} are filled in
    expect: str  # a piece of the one stderr line
    setup: object = None  # callable(d) run before the snapshot
    root_skips: bool = False  # needs a folder root can't be refused from
    env: dict = field(default_factory=dict)


P = ["prune", "--config", "{tiny}", "--quiet"]
# fmt: off
CASES = [
    # config values: ranges, finiteness, types, names (answered before torch is imported)
    Case("lr-inf", [*P, "--set", "lr=inf"], "lr must be a finite number"),
    Case("momentum-nan", [*P, "--set", "momentum=nan"], "momentum must be a finite number"),
    Case("kappa-nan", [*P, "--set", "kappa=nan"], "kappa must be a finite number"),
    Case("cpus-inf", [*P, "--set", "cpus_per_evaluator=inf"], "cpus_per_evaluator must be a fin"),
    Case("seed-overflow", [*P, "--set", "seed=1180591620717411303424"], "seed"),
    Case("seed-negative", [*P, "--set", "seed=-1"], "seed must be in"),
    Case("population-huge", [*P, "--set", "population_size=1000000000"], "memory"),
    Case("population-1e9", [*P, "--set", "population_size=1e9"], "memory"),
    Case("population-small", [*P, "--set", "population_size=3"], "population_size must be >= 4"),
    Case("batch-zero", [*P, "--set", "batch_size=0"], "batch_size must be >= 1"),
    Case("lr-negative", [*P, "--set", "lr=-1"], "lr must be > 0"),
    Case("momentum-2", [*P, "--set", "momentum=2"], "momentum must be in [0, 1]"),
    Case("F-out-of-range", [*P, "--set", "F=1.5"], "F must be in [0, 1]"),
    Case("timeout-zero", [*P, "--set", "generation_timeout_s=0"], "generation_timeout_s"),
    Case("input-size-huge", [*P, "--set", "input_size=100000"], "input_size"),
    Case("unknown-key", [*P, "--set", "populaton_size=8"], "unknown config key 'populaton_size'"),
    Case("wrong-type", [*P, "--set", "lr=fast"], "lr must be float"),
    Case("set-no-value", [*P, "--set", "epochs"], "--set needs key=value"),
    Case("device-pattern", [*P, "--set", "device=cuda:x"], "device must be"),
    Case("unknown-model", [*P, "--set", "model=vgg_nope"], "unknown model 'vgg_nope'"),
    # config files
    Case("config-missing", ["prune", "--config", "{d}/nope.yaml"], "not found"),
    Case("config-binary", ["prune", "--config", "{d}/bad.yaml"], "not a text file", _binary),
    Case("config-list", ["prune", "--config", "{d}/bad.yaml"], "must hold a mapping",
         lambda d: _edit_config(d, "- 1\n- 2\n")),  # fmt: skip
    Case("config-int-keys", ["prune", "--config", "{d}/bad.yaml"], "is not a name",
         lambda d: _edit_config(d, "1: 2\nlr: 0.1\n")),  # fmt: skip
    Case("config-broken", ["prune", "--config", "{d}/bad.yaml"], "is not valid YAML",
         lambda d: _edit_config(d, "lr: [0.1\n")),  # fmt: skip
    Case("config-deep", ["prune", "--config", "{d}/bad.yaml"], "config file",
         lambda d: _edit_config(d, "lr: " + "[" * 20000 + "]" * 20000 + "\n")),  # fmt: skip
    Case("alias-bomb", ["prune", "--config", "{d}/bomb.yaml"], "lr must be float", _alias_bomb),
    # the command line
    Case("argparse-unknown", ["prune", "--bogus"], "unrecognized arguments"),
    Case("argparse-choice", ["prune", "--backend", "gpu"], "invalid choice"),
    Case("argparse-required", ["sweep"], "required"),
    Case("out-empty", [*P, "--out", ""], "--out is empty"),
    Case("compare-out-empty", ["compare", "--config", "{tiny}", "--out", ""], "--out is empty"),
    # the output folder: nothing of the user's is ever replaced
    Case("out-is-file", [*P, "--out", "{run}/report.json"], "is a file"),
    Case("out-under-file", [*P, "--out", "{run}/report.json/x"], "under the file"),
    Case("out-read-only", [*P, "--out", "{d}/ro/new"], "not writable", _read_only, True),
    Case("out-user-folder", [*P, "--out", "{user}"], "not an edrop_ray run folder"),
    Case("out-user-overwrite", [*P, "--out", "{user}", "--overwrite"], "not an edrop_ray run"),
    Case("out-holds-run", [*P, "--out", "{run}"], "already holds a run"),
    Case("overwrite-bad-batch", [*P, "--out", "{run}", "--overwrite", "--set", "batch_size=5000"],
         "batch_size 5000 is larger than the training set"),  # fmt: skip
    Case("overwrite-nan", [*P, "--out", "{run}", "--overwrite", "--set", "momentum=nan"],
         "momentum"),  # fmt: skip
    Case("overwrite-run-with-notes", [*P, "--out", "{run}", "--overwrite"], "'notes.txt'",
         lambda d: replace_file(d / "run" / "notes.txt", "mine")),  # fmt: skip
    Case("overwrite-stage-in-the-way", [*P, "--out", "{run}", "--overwrite"], "in the way",
         lambda d: (d / "run.new").mkdir()),  # fmt: skip
    Case("ray-address-dead", [*P, "--out", "{run}", "--overwrite", "--backend", "ray", "--set",
                              "ray_address=127.0.0.1:1", "--set", "ray_connect_timeout_s=3"],
         "nothing answers at ray_address"),  # fmt: skip
    # data
    Case("mnist-garbage", [*P, "--out", "{d}/new", "--set", "dataset=mnist", "--set",
                           "data_root={d}/data"], "cannot be read", _garbage_mnist),  # fmt: skip
    Case("cifar-missing", [*P, "--out", "{d}/new", "--set", "dataset=cifar10", "--set",
                           "data_root={d}/none"], "missing"),  # fmt: skip
    # compare
    Case("compare-nan", ["compare", "--config", "{tiny}", "--out", "{d}/cmp", "--overwrite",
                         "--set", "momentum=nan"], "momentum", _compare_folder),  # fmt: skip
    Case("compare-bad-batch", ["compare", "--config", "{tiny}", "--out", "{d}/cmp", "--overwrite",
                               "--set", "batch_size=5000"], "batch_size 5000",
         _compare_folder),  # fmt: skip
    Case("compare-into-run", ["compare", "--config", "{tiny}", "--out", "{run}", "--overwrite"],
         "holds a run, not a comparison"),  # fmt: skip
    Case("compare-user-folder", ["compare", "--config", "{tiny}", "--out", "{user}",
                                 "--overwrite"], "not an edrop_ray run folder"),  # fmt: skip
    # resume
    Case("resume-finished", ["resume", "{run}"], "is finished"),
    Case("resume-user-folder", ["resume", "{user}"], "checkpoint"),
    Case("resume-nothing", ["resume", "{d}/none"], "is not a run directory"),
    Case("resume-unknown-key", ["resume", "{d}/run2"], "unknown config key 'bogus'",
         lambda d: _fake_checkpoint(d, {**_tiny_config(), "bogus": 1})),  # fmt: skip
    Case("resume-edited-config", ["resume", "{d}/run2"], "says lr: 0.5",
         lambda d: _fake_checkpoint(d, _tiny_config(), {**_tiny_config(), "lr": 0.5})),
    Case("resume-old-streams", ["resume", "{d}/run2"], "random streams version 0",
         lambda d: _fake_checkpoint(d, _tiny_config(), streams=0)),
    Case("resume-corrupt", ["resume", "{d}/run2"], "corrupt or truncated",
         lambda d: (_fake_checkpoint(d, _tiny_config()),
                    replace_file(d / "run2" / "checkpoint.pt", b"PK\x03\x04"))),  # fmt: skip
    # report
    Case("report-empty-json", ["report", "{run}"], "does not hold a run report",
         lambda d: replace_file(d / "run" / "report.json", "{}")),  # fmt: skip
    Case("report-list-json", ["report", "{run}"], "does not hold a run report",
         lambda d: replace_file(d / "run" / "report.json", "[1, 2]")),  # fmt: skip
    Case("report-string-number", ["report", "{run}"], "is not a number",
         lambda d: replace_file(d / "run" / "report.json", json.dumps({
             **json.loads((d / "run" / "report.json").read_text()), "pruned_top1": "high"}))),
    Case("report-bad-parquet", ["report", "{run}"], "not a readable Parquet",
         lambda d: replace_file(d / "run" / "history.parquet", os.urandom(4096))),
    Case("report-not-a-run", ["report", "{d}"], "is not a run or sweep directory"),
    # export and evaluate
    Case("export-under-file", ["export", "{run}", "--output", "{run}/report.json/m.pt"],
         "under the file"),  # fmt: skip
    Case("export-read-only", ["export", "{run}", "--output", "{d}/ro/m.pt"], "not writable",
         _read_only, True),  # fmt: skip
    Case("export-empty", ["export", "{run}", "--output", ""], "--output is empty"),
    Case("export-folder", ["export", "{run}", "--output", "{user}"], "is a folder"),
    Case("export-not-a-run", ["export", "{user}"], "is not a run directory"),
    Case("report-user-folder", ["report", "{user}"], "is not a run directory"),
    Case("evaluate-missing-data", ["evaluate", "{run}", "--dataset", "cifar10", "--data-root",
                                   "{d}/none"], "missing"),  # fmt: skip
    # sweep
    Case("sweep-space-binary", ["sweep", "--config", "{tiny}", "--space", "{d}/bad.yaml"],
         "not a text file", _binary),  # fmt: skip
    Case("sweep-space-missing", ["sweep", "--config", "{tiny}", "--space", "{d}/nope.yaml"],
         "not found"),  # fmt: skip
    Case("sweep-out-read-only", ["sweep", "--config", "{tiny}", "--space",
                                 str(ROOT / "configs" / "space_tiny.yaml"), "--out",
                                 "{d}/ro/sweep"], "not writable", _read_only, True),  # fmt: skip
    Case("sweep-out-user-folder", ["sweep", "--config", "{tiny}", "--space",
                                   str(ROOT / "configs" / "space_tiny.yaml"), "--out", "{user}"],
         "not a sweep folder"),  # fmt: skip
]
# fmt: on
IDS = [c.name for c in CASES]
assert len(set(IDS)) == len(IDS)


def _prepare(case: Case, d: Path, run: Path) -> list[str]:
    shutil.copytree(run, d / "run", copy_function=os.link)
    user = d / "user"
    (user / "plots").mkdir(parents=True)
    (user / "config.yaml").write_text("lr: 0.1  # my own notes\n")
    (user / "plots" / "figure.png").write_bytes(b"\x89PNG mine")
    (user / "notes.txt").write_text("do not lose me\n")
    if case.setup is not None:
        case.setup(d)
    fill = {"{run}": str(d / "run"), "{user}": str(user), "{d}": str(d), "{tiny}": TINY}
    argv = []
    for a in case.argv:
        for k, v in fill.items():
            a = a.replace(k, v)
        argv.append(a)
    return argv


def _run_case(case: Case, d: Path, argv: list[str]) -> dict:
    before = snapshot(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "EDROP_RAY_CACHE": str(d / ".." / "cache"), **case.env}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "edrop_ray", *argv], capture_output=True,
                          text=True, cwd=d, env=env, timeout=300)  # fmt: skip
    return {"rc": proc.returncode, "err": proc.stderr, "before": before, "after": snapshot(d)}


@pytest.fixture(scope="module")
def outcomes(finished_run, tmp_path_factory) -> dict[str, dict]:
    """Every case's exit status, stderr and snapshots, run a few at a time."""
    base = tmp_path_factory.mktemp("cases")
    jobs = {}
    for case in CASES:
        if case.root_skips and IS_ROOT:
            continue
        d = base / case.name
        d.mkdir()
        jobs[case.name] = (case, d, _prepare(case, d, finished_run))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {n: pool.submit(_run_case, c, d, a) for n, (c, d, a) in jobs.items()}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.timeout(1800)  # the first case waits for them all (seconds on an idle machine)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_keeps_the_contract(case: Case, outcomes):
    if case.root_skips and IS_ROOT:
        pytest.skip("root writes into read-only folders")
    got = outcomes[case.name]
    lines = got["err"].strip().splitlines()
    assert got["rc"] == 2, got["err"][-2000:]
    assert len(lines) == 1, got["err"][-2000:]
    assert "Traceback" not in got["err"]
    assert case.expect in lines[0], lines[0]
    assert lines[0].startswith("edrop-ray"), lines[0]
    assert got["after"] == got["before"]  # byte for byte, modes too; nothing added


# --------------------------------------------------------------------------- --overwrite itself


def test_the_finished_run_identifies_itself(finished_run):
    assert store.folder_kind(finished_run) == "run"
    marker = store.read_marker(finished_run)
    assert marker["format"] == store.RUN_FORMAT and "replaces" not in marker
    assert marker["config"] == yaml.safe_load((finished_run / "config.yaml").read_text())


def test_files_of_a_run_follow_the_umask(finished_run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in finished_run.rglob("*") if p.is_file()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_overwrite_replaces_a_run_of_the_previous_version(finished_run, tmp_path):
    """A run made before the marker existed (config.yaml + report.json) is recognised and
    replaced whole; the new run is swapped in only at the end."""
    old = tmp_path / "demo"
    shutil.copytree(finished_run, old)
    (old / store.MARKER).unlink()
    (old / "mask.pt").unlink()  # so that the new run's mask.pt can only be the new one
    assert store.folder_kind(old) == "run"
    code = main(["prune", "--config", TINY, "--backend", "local", "--out", str(old), "--quiet",
                 "--overwrite", *FAST])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no demo.new, no old copy
    assert store.read_marker(old)["format"] == store.RUN_FORMAT
    a = torch.load(finished_run / "mask.pt", weights_only=True)["mask"]
    b = torch.load(old / "mask.pt", weights_only=True)["mask"]
    assert torch.equal(a, b)  # the same seed gives the same mask


@pytest.mark.parametrize("checkpointed", [False, True])
def test_interrupted_overwrite_keeps_the_old_run(finished_run, tmp_path, monkeypatch,
                                                checkpointed):  # fmt: skip
    """Ctrl-C while the new run is going: the old run is untouched; the new one is kept beside
    it only when it has a checkpoint to resume from, and the message names that real folder."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(tmp_path)

    def interrupted(cfg, run_dir, *a, **k):
        assert run_dir == tmp_path / "run.new"
        if checkpointed:
            store.save_checkpoint(run_dir, {"format": store.CHECKPOINT_FORMAT})
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "_execute", interrupted)
    cfg = Config(**{**yaml.safe_load(Path(TINY).read_text()), "input_size": 8})
    with pytest.raises(RunInterrupted) as e:
        job.prune(cfg, out, overwrite=True, quiet=True)
    if checkpointed:
        assert e.value.run_dir == tmp_path / "run.new"
        assert (tmp_path / "run.new" / "checkpoint.pt").is_file()
        shutil.rmtree(tmp_path / "run.new")
    else:
        assert e.value.run_dir is None
    assert snapshot(tmp_path) == before


def test_a_failed_new_run_in_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    def failing(*a, **k):
        raise UserError("the loss is NaN")

    monkeypatch.setattr(job, "_execute", failing)
    cfg = Config(**{**yaml.safe_load(Path(TINY).read_text()), "input_size": 8})
    with pytest.raises(UserError):
        job.prune(cfg, tmp_path / "new", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_a_target_that_gained_files(tmp_path):
    """The swap re-checks the old folder: files added to it during the run are never deleted."""
    old = tmp_path / "run"
    old.mkdir()
    store.write_json(old / store.MARKER, {"format": store.RUN_FORMAT, "kind": "run"})
    store.check_out(old, overwrite=True)
    staged = store.stage_out(old)
    assert staged == tmp_path / "run.new"
    (old / "notes.txt").write_text("written while the new run went on")
    with pytest.raises(UserError, match="nothing was replaced"):
        store.commit_out(staged)
    assert (old / "notes.txt").is_file() and staged.is_dir()


# --------------------------------------------------------------------------- property: any value


def _values():
    from hypothesis import strategies as st

    floats = st.floats(allow_nan=True, allow_infinity=True)
    ints = st.integers(min_value=-(2**80), max_value=2**80)
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        ints,
        floats,
        st.text(max_size=12),
        st.sampled_from(["nan", "inf", "-inf", "1e9", "true", "null", "cuda:1"]),
    )
    return st.one_of(scalars, st.lists(scalars, max_size=3),
                     st.dictionaries(st.text(max_size=3), scalars, max_size=2))  # fmt: skip


def test_any_value_of_any_key_is_a_valid_config_or_one_line_naming_the_key(tmp_path):
    """For every key, a value of every type, given in a YAML file or with --set: either a config
    whose every number is finite and in range, or one UserError line that names the key."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from edrop_ray.config import load_config, validate

    keys = sorted(Config.__dataclass_fields__)

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    @hypothesis.given(key=st.sampled_from(keys), value=_values(), via_set=st.booleans())
    def check(key, value, via_set):
        path = tmp_path / "c.yaml"
        try:
            if via_set:
                text = yaml.safe_dump(value, default_flow_style=True).strip()
                text = text.removesuffix("...").strip()
                cfg = load_config(TINY, [f"{key}={text}"])
            else:
                base = yaml.safe_load(Path(TINY).read_text())
                path.write_text(yaml.safe_dump({**base, key: value}))
                cfg = load_config(path)
        except UserError as e:
            message = str(e)
            assert len(message.splitlines()) == 1 and len(message) < 2000, message
            assert key in message, message
            return
        assert validate(cfg) == cfg
        for k, v in config_to_dict(cfg).items():
            if isinstance(v, float):
                assert v == v and abs(v) != float("inf"), (k, v)
            if isinstance(v, int):
                assert -(2**63) <= v < 2**63, (k, v)

    check()


def test_overwrite_of_the_current_folder_stages_beside_it(tmp_path, monkeypatch):
    """--out . names a folder too: the new run goes beside it, never inside it."""
    old = tmp_path / "run"
    old.mkdir()
    store.write_json(old / store.MARKER, {"format": store.RUN_FORMAT, "kind": "run"})
    (old / "report.json").write_text("{}")
    monkeypatch.chdir(old)
    store.check_out(".", overwrite=True)
    staged = store.stage_out(".")
    assert staged == tmp_path / "run.new"
    (staged / "report.json").write_text('{"new": 1}')
    assert store.commit_out(staged) == old
    assert json.loads((old / "report.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
