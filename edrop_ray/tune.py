"""``edrop-ray sweep``: Ray Tune sweeps over EDropout's hyper-parameters (Ray 2.60 ``ray.tune``).

Each trial is one whole EDropout run (:class:`~edrop_ray.loop.Learner` +
:class:`~edrop_ray.search.Search` driven by :func:`~edrop_ray.loop.run_edropout`) on the trial's
config; at the end the masked model is evaluated (Top-1/Top-5 on the test set) and physically
slimmed to count its parameters.

Design choices
--------------
* **In process inside a trial.** Every trial runs with ``backend=local`` whatever the base config
  says: the parallelism of a sweep is across trials, and one trial is one Ray actor holding one
  placement-group bundle ``{CPU: trainer_cpus or 1, GPU: trainer_gpus}`` (``trainer_gpus`` -1 =
  auto: 0 without GPUs, 0.5 on one GPU, 1 on several, like the Ray backend's trainer). A trial
  with ``backend=ray`` would need ``num_evaluators`` more bundles ``{CPU: cpus_per_evaluator,
  GPU: gpus_per_evaluator}`` in its factory *and* an inner runtime that schedules its actors into
  that placement group; that is not done here (:func:`trial_resources` is where it would go).
* **The base config** reaches trials through ``tune.with_parameters`` (so Tune's tables and
  ``params.json`` show only the searched keys); ``sweep_spec.json`` keeps it with the space.
* **What is optimised.** While trials run, ASHA early-stops on ``best_energy`` (min), the
  quantity EDropout itself minimises (cross-entropy of the best state's masked network, plus
  ``sparsity_lambda`` x kept fraction), compared at equal training ``step`` (``time_attr``), the
  budget every trial shares whatever its ``evolve_every``. Final rows are ranked by Top-1 then
  prune rate, and the rows on the Pareto front of (Top-1, prune rate) are marked: the trade-off
  is shown rather than folded into one made-up score. ASHA only runs with at least 4 trials
  (its reduction factor): with fewer, a rung holds too few results to cut fairly, so the
  scheduler is then FIFO (every trial runs to the end and has a Top-1). Caveat: when
  ``sparsity_lambda`` is searched, energies carry different penalties across trials, so ASHA's
  comparison mixes accuracy and sparsity the way each trial weighs them.
* **Fault tolerance.** Every ``checkpoint_every`` generations (and, once the mask is frozen,
  every ``checkpoint_every x evolve_every`` steps) a trial reports a checkpoint holding the
  learner's and the search's state (``torch.save``; loaded with ``weights_only=True``); a trial
  that restarts (``FailureConfig(max_failures=2)``) continues from it via ``tune.get_checkpoint``.
  Running ``edrop-ray sweep`` again with the same ``--out`` (and the same config, space and
  samples) resumes the experiment with ``Tuner.restore`` when ``Tuner.can_restore`` says so:
  finished trials are kept, unfinished and errored ones continue from their last checkpoint.

Sweep folder (``--out``, Tune's ``storage_path``): ``sweep_spec.json`` (base config, space,
samples), ``tune/`` (Tune's experiment: one folder per trial, checkpoints, ``tuner.pkl``),
``sweep.json`` and ``sweep.md`` (one row per trial).

Space YAML: ``key: spec`` where key is one of :data:`SEARCHABLE` and spec is ``{choice: [..]}``,
``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends
included) or a plain list (a grid: every value is run, ``--samples`` times each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import store
from .config import Config, _coerce, _field_types, config_to_dict, load_config, validate
from .errors import UserError

__all__ = [
    "SEARCHABLE",
    "DISTRIBUTIONS",
    "load_space",
    "check_space",
    "to_param_space",
    "trial_resources",
    "sweep",
    "run_sweep_cli",
    "save_trial_state",
    "load_trial_state",
    "edropout_trial",
]

# Config fields a space may search over.
SEARCHABLE = (
    "population_size", "F", "CR", "mutation", "kappa", "sparsity_lambda", "target_prune_rate",
    "evolve_every", "p0", "energy_batch_size", "patience", "diversity_threshold", "lr",
    "momentum", "weight_decay",
)  # fmt: skip
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")

METRIC, MODE = "best_energy", "min"  # ASHA's metric while trials run
TIME_ATTR = "step"  # ASHA compares trials at equal training steps
REDUCTION_FACTOR = 4
EXPERIMENT = "tune"  # Tune's experiment folder inside the sweep folder
SPEC_FILE = "sweep_spec.json"
STATE_FILE = "trial_state.pt"
MASK_FILE = "mask.pt"


# ---------------------------------------------------------------------------- the search space


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a space YAML file (not yet checked: see :func:`check_space`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"space file {str(p)!r} not found; pass an existing --space FILE")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"space file {str(p)!r} is not valid YAML: {e}".splitlines()[0]) from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"space file {str(p)!r} must hold a mapping of key: distribution")
    return loaded


def _check_value(base: Config, key: str, value: Any, source: str) -> Any:
    """``value`` coerced to ``key``'s type and validated against ``base``; UserError if not."""
    try:
        v = _coerce(key, value)
        validate(dataclasses.replace(base, **{key: v}))
    except UserError as e:
        why = str(e).split("; e.g. --set")[0]
        raise UserError(f"{source}: {key} value {value!r} is invalid: {why}") from None
    return v


def _pair(key: str, name: str, spec: Any, source: str) -> tuple[float, float]:
    ok = (
        isinstance(spec, list | tuple)
        and len(spec) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in spec)
    )
    if not ok or not spec[0] < spec[1]:
        raise UserError(f"{source}: {key}: {{{name}: [lo, hi]}} needs two numbers with lo < hi, "
                        f"got {spec!r}")  # fmt: skip
    return spec[0], spec[1]


def check_space(space: Any, base: Config, source: str = "--space") -> dict[str, tuple[str, Any]]:
    """Validate a raw space against ``base``: ``{key: (distribution, args)}`` or UserError.

    Every value a distribution can produce is checked with the config's own validation (each
    field's valid set is an interval or a set of choices, so the ends and the choices suffice).
    """
    if not isinstance(space, dict):
        raise UserError(f"{source}: the space must be a mapping of key: distribution")
    if not space:
        raise UserError(
            f"{source}: the search space is empty; give at least one of: {', '.join(SEARCHABLE)}"
        )
    fields = _field_types()
    checked: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        if key not in SEARCHABLE:
            what = "is not searchable" if key in fields else "is not a config key"
            raise UserError(f"{source}: {key!r} {what}; searchable keys: {', '.join(SEARCHABLE)}")
        kind = str(fields[key]).split("|")[0].strip()
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{source}: {key}: a grid (plain list) needs at least one value")
            checked[key] = ("grid", [_check_value(base, key, v, source) for v in spec])
            continue
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise UserError(
                f"{source}: {key}: expected {{choice: [..]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}} or a plain list, got {spec!r}"
            )
        name, args = next(iter(spec.items()))
        if name not in DISTRIBUTIONS:
            raise UserError(
                f"{source}: {key}: unknown distribution {name!r}; use one of "
                f"{', '.join(DISTRIBUTIONS)}, or a plain list for a grid"
            )
        if name == "choice":
            if not isinstance(args, list) or not args:
                raise UserError(f"{source}: {key}: {{choice: [..]}} needs a non-empty list")
            checked[key] = (name, [_check_value(base, key, v, source) for v in args])
            continue
        lo, hi = _pair(key, name, args, source)
        if name in ("uniform", "loguniform"):
            if kind != "float":
                raise UserError(
                    f"{source}: {key} takes {kind} values; {name} draws floats: use "
                    f"{'randint or ' if kind == 'int' else ''}choice"
                )
            if name == "loguniform" and lo <= 0:
                raise UserError(f"{source}: {key}: loguniform needs 0 < lo < hi, got {args!r}")
            checked[key] = (name, (_check_value(base, key, lo, source),
                                   _check_value(base, key, hi, source)))  # fmt: skip
        else:  # randint, both ends included
            if kind not in ("int", "float") or not all(float(x).is_integer() for x in (lo, hi)):
                raise UserError(f"{source}: {key}: randint needs integer ends and a numeric key, "
                                f"got {args!r}")  # fmt: skip
            _check_value(base, key, lo, source)
            _check_value(base, key, hi, source)
            checked[key] = (name, (int(lo), int(hi)))
    return checked


def to_param_space(checked: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Tune's ``param_space`` entries for a checked space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, (name, args) in checked.items():
        if name == "grid":
            out[key] = tune.grid_search(list(args))
        elif name == "choice":
            out[key] = tune.choice(list(args))
        elif name == "uniform":
            out[key] = tune.uniform(*args)
        elif name == "loguniform":
            out[key] = tune.loguniform(*args)
        else:
            out[key] = tune.randint(args[0], args[1] + 1)  # Tune's upper end is exclusive
    return out


def _grid_size(checked: dict[str, tuple[str, Any]]) -> int:
    return math.prod(len(args) for name, args in checked.values() if name == "grid")


# ---------------------------------------------------------------------------- resources


def _trial_cpus(cfg: Config) -> float:
    return cfg.trainer_cpus or 1.0


def trial_gpus(cfg: Config, cluster: dict[str, float]) -> float:
    """GPUs of one trial: ``trainer_gpus``, or with -1 (auto) 0 / 0.5 / 1 for 0 / 1 / 2+ GPUs."""
    if cfg.device == "cpu":
        return 0.0
    if cfg.trainer_gpus >= 0:
        return cfg.trainer_gpus
    gpus = float(cluster.get("GPU", 0.0))
    return 1.0 if gpus >= 2 else (0.5 if gpus >= 1 else 0.0)


def trial_resources(cfg: Config, cluster: dict[str, float]):
    """The placement group of one trial: a single bundle for the in-process EDropout run.

    (A trial on the Ray backend would add ``num_evaluators`` bundles ``{CPU: cpus_per_evaluator,
    GPU: gpus_per_evaluator}`` here; trials are forced to ``backend=local``, see the module doc.)
    """
    from ray import tune

    bundle: dict[str, float] = {"CPU": _trial_cpus(cfg)}
    gpus = trial_gpus(cfg, cluster)
    if gpus > 0:
        bundle["GPU"] = gpus
    return tune.PlacementGroupFactory([bundle])


# ---------------------------------------------------------------------------- the trial


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's draws) as Python values."""
    return v.item() if hasattr(v, "item") and not isinstance(v, str | bytes) else v


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The resolved Config of one trial: the base config, the trial's draws, ``backend=local``."""
    values = dict(base)
    values.update({k: _coerce(k, _plain(v)) for k, v in params.items()})
    values["backend"] = "local"
    return validate(Config(**values))


def save_trial_state(directory: str | Path, learner, search, metrics: dict[str, Any]) -> None:
    """Write a trial checkpoint (learner + search state, last reported metrics) to a folder."""
    store.save_torch(
        Path(directory) / STATE_FILE,
        {
            "format": "edrop_ray.trial/1",
            "learner": learner.state_dict(),
            "search": search.state_dict(),
            "metrics": dict(metrics),
        },
    )


def load_trial_state(directory: str | Path, learner, search) -> dict[str, Any]:
    """Restore ``learner`` and ``search`` from :func:`save_trial_state`'s folder; return the
    metrics reported with it."""
    import torch

    blob = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "edrop_ray.trial/1":
        raise ValueError(f"{directory} does not hold an edrop_ray trial checkpoint")
    learner.load_state_dict(blob["learner"])
    search.load_state_dict(blob["search"])
    return dict(blob["metrics"])


def _trial_device(cfg: Config):
    """The trial's device: its (Ray-assigned) GPU when it has one and the config allows it."""
    import torch

    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def edropout_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune function trainable: one EDropout run on the ``base`` config (a dict, bound with
    ``tune.with_parameters``) with the trial's draws ``config`` applied."""
    import torch
    from ray import tune

    from .budget import counter_for
    from .data import load_for
    from .loop import Learner, measure_pruned, run_edropout
    from .search import Search

    cfg = trial_config(base, config)
    torch.set_num_threads(max(1, cfg.cpu_threads or int(_trial_cpus(cfg))))
    train_set, test_set, info = load_for(cfg)
    learner = Learner(cfg, train_set, info, _trial_device(cfg))
    counter = counter_for(cfg, learner.model, learner.units, learner.example)
    search = Search.from_config(cfg, learner.units.num_units, counter=counter)
    last: dict[str, Any] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            last = load_trial_state(d, learner, search)

    def report(metrics: dict[str, Any], *, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_trial_state(d, learner, search, metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    def on_generation(record: dict[str, Any]) -> None:
        last.clear()
        last.update(
            generation=record["generation"],
            step=record["step"],
            best_energy=record["best_energy"],
            mean_energy=record["mean_energy"],
            kept_fraction=record["kept_fraction"],
            diversity=record["diversity"],
            train_loss=record["train_loss"],
            frozen=record["frozen"],
        )
        every = cfg.checkpoint_every
        report(dict(last), with_checkpoint=bool(every) and record["generation"] % every == 0)

    def on_checkpoint() -> None:
        # Generations checkpoint themselves; once the mask is frozen there are none, so the
        # training steps that remain are checkpointed (and reported) on the step schedule.
        if search.frozen:
            last["step"] = learner.step
            report(dict(last), with_checkpoint=True)

    run_edropout(learner, search, on_generation=on_generation, on_checkpoint=on_checkpoint)

    final = search.best.clone()
    _slim, measured = measure_pruned(learner, test_set, final)
    result = {
        **last,
        "step": learner.step,
        "generation": search.generation,
        **measured,
        "converged_at": -1 if search.converged_at is None else search.converged_at,
    }
    with tempfile.TemporaryDirectory() as d:  # the final mask, as the trial's last checkpoint
        mask = {"mask": final.cpu(), "layers": learner.units.layer_of_units()}
        store.save_torch(Path(d) / MASK_FILE, mask)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------------- the sweep


def _spec(cfg: Config, checked: dict[str, tuple[str, Any]], samples: int) -> dict[str, Any]:
    return {
        "format": "edrop_ray.sweep-spec/1",
        "base_config": config_to_dict(cfg),
        "space": {k: [name, list(args)] for k, (name, args) in checked.items()},
        "samples": samples,
    }


def _check_storage(path: Path, spec: dict[str, Any]) -> bool:
    """True when ``path`` holds this very sweep (to resume); UserError when it holds anything
    else; False when it is new or empty."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(path)!r} is a file; pass a folder path")
    store.check_writable(path, "--out")  # before Ray starts, not when Tune first writes
    if not path.is_dir() or not any(path.iterdir()):
        return False
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"--out {str(path)!r} exists and is not a sweep folder; pick another --out")
    try:
        old = json.loads(spec_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{str(spec_file)!r} is damaged; pick another --out") from None
    if json.loads(json.dumps(spec)) != old:
        raise UserError(
            f"--out {str(path)!r} holds a sweep with another config, space or --samples; "
            "Tune cannot change them on resume: pick another --out"
        )
    return True


def _connect(cfg: Config, quiet: bool) -> bool:
    """Attach to Ray (running instance, ``ray_address``/``RAY_ADDRESS``, or a new local one);
    True when this call started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    level = logging.WARNING if quiet else logging.INFO
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=level)
        return False
    ray.init(
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=level,
    )
    return True


def _rows(results, keys: list[str]) -> list[dict[str, Any]]:
    # Tune's Trial objects (status, and the config of trials that never started) sit behind the
    # ResultGrid, in the same order as its results; without them, status comes from metrics.
    analysis = getattr(results, "_experiment_analysis", None)
    trials = list(getattr(analysis, "trials", None) or [])
    if len(trials) != len(results):
        trials = [None] * len(results)
    rows = []
    for r, trial in zip(results, trials, strict=True):
        m = dict(r.metrics or {})
        config = r.config or getattr(trial, "config", None) or {}
        tune_status = getattr(trial, "status", None)
        if "top1" in m:
            status = "finished"
        elif r.error is not None:
            status = "error"
        elif tune_status in (None, "TERMINATED"):
            status = "stopped"  # early-stopped by ASHA
        else:
            status = "unfinished"  # interrupted: run the same sweep again to resume it
        error = None
        if r.error is not None:
            lines = [ln for ln in str(r.error).strip().splitlines() if ln.strip()]
            error = lines[-1][:300] if lines else type(r.error).__name__
        rows.append({
            "trial_id": m.get("trial_id", getattr(trial, "trial_id", None)),
            "params": {k: _plain(config.get(k)) for k in keys},
            "status": status,
            "error": error,
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "prune_rate": m.get("prune_rate"),
            "params_pruned": m.get("params_pruned"),
            "params_dense": m.get("params_dense"),
            "macs_pruned": m.get("macs_pruned"),
            "kept_fraction": m.get("kept_fraction"),
            "best_energy": m.get("best_energy"),
            "generation": m.get("generation"),
            "step": m.get("step"),
            "path": r.path,
        })  # fmt: skip
    done = [r for r in rows if r["status"] == "finished"]
    for r in rows:
        r["pareto"] = r["status"] == "finished" and not any(
            o["top1"] >= r["top1"]
            and o["prune_rate"] >= r["prune_rate"]
            and (o["top1"] > r["top1"] or o["prune_rate"] > r["prune_rate"])
            for o in done
        )
    rows.sort(key=lambda r: (r["top1"] is None, -(r["top1"] or 0.0), -(r["prune_rate"] or 0.0)))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sweep_markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The ``sweep.md`` table: one line per trial, best Top-1 first; * = on the Pareto front of
    (Top-1, prune rate)."""
    head = ["#", "trial", *keys, "top1 %", "top5 %", "prune rate %", "params", "status", "pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        pr = None if r["prune_rate"] is None else 100 * r["prune_rate"]
        cells = [str(i), _fmt(r["trial_id"]), *(_fmt(r["params"][k]) for k in keys),
                 _fmt(r["top1"]), _fmt(r["top5"]), _fmt(pr), _fmt(r["params_pruned"]),
                 r["status"], "*" if r["pareto"] else ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nRanked by Top-1, then prune rate; * marks the Pareto front of (Top-1, prune rate). "
        f"ASHA (when used) early-stops on {METRIC} ({MODE}) at equal training {TIME_ATTR}.\n"
    )
    return "\n".join(lines) + "\n" + note


def sweep(
    cfg: Config,
    space: dict[str, Any],
    *,
    samples: int,
    storage_path: str | Path,
    quiet: bool = False,
    scheduler: str = "auto",
) -> list[dict[str, Any]]:
    """Run (or resume) a Tune sweep of EDropout over ``space`` (the raw YAML mapping); return
    one row per trial, best Top-1 first. Results go to ``storage_path`` (see the module doc).

    ``scheduler``: ``auto`` (ASHA with 4+ trials, else FIFO), ``asha`` or ``fifo``.
    Everything is validated before Ray starts or anything is written.
    """
    if scheduler not in ("auto", "asha", "fifo"):
        raise ValueError(f"scheduler must be auto, asha or fifo, got {scheduler!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"--samples must be a positive integer, got {samples!r}")
    checked = check_space(space, cfg)
    # Trials run in process (see the module doc) in their own working directory (Tune changes
    # into the trial folder), so the data root must be absolute.
    trial_cfg = dataclasses.replace(
        cfg, backend="local", data_root=str(Path(cfg.data_root).expanduser().resolve())
    )
    path = Path(storage_path).expanduser().resolve()
    spec = _spec(trial_cfg, checked, samples)
    resuming = _check_storage(path, spec)

    from .data import load_for

    _, _, info = load_for(cfg, trial_cfg.data_root)  # data errors surface here, before Ray starts
    steps_per_epoch = info.train_size // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"batch_size {cfg.batch_size} is larger than the training set ({info.train_size}); "
            "lower --set batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    trials = samples * _grid_size(checked)
    use_asha = scheduler == "asha" or (scheduler == "auto" and trials >= REDUCTION_FACTOR)
    if cfg.backend != "local" and not quiet:
        print("edrop-ray: note: sweep trials run EDropout in process (backend=local); the "
              "parallelism is across trials", file=sys.stderr)  # fmt: skip

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = _connect(cfg, quiet)
    try:
        resources = trial_resources(trial_cfg, ray.cluster_resources())
        trainable = tune.with_resources(
            tune.with_parameters(edropout_trial, base=config_to_dict(trial_cfg)), resources
        )
        path.mkdir(parents=True, exist_ok=True)
        store.write_json(path / SPEC_FILE, spec)
        experiment = path / EXPERIMENT
        if resuming and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(
                str(experiment), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            if use_asha:
                sched = ASHAScheduler(
                    time_attr=TIME_ATTR,
                    metric=METRIC,
                    mode=MODE,
                    max_t=max(1, total_steps),
                    grace_period=max(1, total_steps // 8),
                    reduction_factor=REDUCTION_FACTOR,
                )
            else:
                sched = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                param_space=to_param_space(checked),
                tune_config=tune.TuneConfig(
                    num_samples=samples,
                    scheduler=sched,
                    search_alg=BasicVariantGenerator(random_state=cfg.seed),
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(path),
                    failure_config=tune.FailureConfig(max_failures=2),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=0 if quiet else 1,
                ),
            )
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()

    keys = list(checked)
    rows = _rows(results, keys)
    store.write_json(
        path / "sweep.json",
        {
            "format": "edrop_ray.sweep/1",
            "metric": METRIC,
            "mode": MODE,
            "time_attr": TIME_ATTR,
            "scheduler": "asha" if use_asha else "fifo",
            "samples": samples,
            "space": spec["space"],
            "tune_path": str(experiment),
            "trials": rows,
        },
    )
    store.write_atomic(path / "sweep.md", sweep_markdown(rows, keys).encode())
    return rows


def run_sweep_cli(args) -> int:
    """``edrop-ray sweep --config C --space S [--samples N] [--set k=v] [--out DIR] [--quiet]``.

    Exit 0 when at least one trial finished and none is left unfinished; 1 otherwise (an
    interrupted sweep: run the same command again to resume it; or no trial finished); 2 on bad
    input (nothing written).
    """
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    out = args.out or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = sweep(cfg, space, samples=args.samples, storage_path=out, quiet=args.quiet)
    path = Path(out).expanduser().resolve()
    finished = sum(r["status"] == "finished" for r in rows)
    if not args.quiet:
        print(sweep_markdown(rows, list(check_space(space, cfg))))
        print(f"sweep folder: {path}")
    unfinished = sum(r["status"] == "unfinished" for r in rows)
    if unfinished:
        print(f"edrop-ray: {unfinished} of {len(rows)} trials unfinished (interrupted); run the "
              "same command again to resume them", file=sys.stderr)  # fmt: skip
    failed = sum(r["status"] == "error" for r in rows)
    if failed:
        print(f"edrop-ray: {failed} of {len(rows)} trials failed; see the error column of "
              f"{path / 'sweep.json'}", file=sys.stderr)  # fmt: skip
    return 0 if finished and not unfinished else 1
