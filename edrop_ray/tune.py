"""``edrop-ray sweep``: Ray Tune sweeps over EDropout's hyper-parameters (Ray 2.60 ``ray.tune``).

Each trial is one whole EDropout run (:class:`~edrop_ray.learner.Learner` +
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
* **Fault tolerance.** A trial is a run of :func:`edrop_ray.run.execute`, like ``edrop-ray
  prune``: every checkpoint the run writes (every ``checkpoint_every x evolve_every`` steps) is
  reported as a Tune checkpoint, the run folder holding the very ``checkpoint.pt`` that
  ``resume`` reads; a trial that restarts (``FailureConfig(max_failures=2)``) loads it with
  :func:`edrop_ray.store.load_checkpoint` via ``tune.get_checkpoint`` and continues from it.
  Running ``edrop-ray sweep`` again with the same ``--out`` (and the same config, space and
  samples) resumes the experiment with ``Tuner.restore`` when ``Tuner.can_restore`` says so:
  finished trials are kept, unfinished and errored ones continue from their last checkpoint.

Sweep folder (``--out``, Tune's ``storage_path``): ``sweep_spec.json`` (base config, space,
samples), ``tune/`` (Tune's experiment: one folder per trial, checkpoints, ``tuner.pkl``),
``sweep.json`` and ``sweep.md`` (one row per trial).

The search space (``--space`` YAML) is read and checked by :mod:`edrop_ray.space`, without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import store
from .cluster import connect_ray
from .config import Config, _coerce, config_to_dict, load_config, validate
from .errors import UserError
from .report.sweep import sweep_markdown, trial_rows
from .space import check_space, grid_size, load_space, to_param_space
from .space import plain as _plain

__all__ = [
    "trial_resources",
    "sweep",
    "run_sweep_cli",
    "edropout_trial",
]

METRIC, MODE = "best_energy", "min"  # ASHA's metric while trials run
TIME_ATTR = "step"  # ASHA compares trials at equal training steps
REDUCTION_FACTOR = 4
EXPERIMENT = "tune"  # Tune's experiment folder inside the sweep folder
SPEC_FILE = "sweep_spec.json"
MASK_FILE = "mask.pt"
_RANKING = (
    "Ranked by Top-1, then prune rate; * marks the Pareto front of (Top-1, prune rate). "
    f"ASHA (when used) early-stops on {METRIC} ({MODE}) at equal training {TIME_ATTR}."
)


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


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The resolved Config of one trial: the base config, the trial's draws, ``backend=local``."""
    values = dict(base)
    values.update({k: _coerce(k, _plain(v)) for k, v in params.items()})
    values["backend"] = "local"
    return validate(Config(**values))


def edropout_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune function trainable: one EDropout run on the ``base`` config (a dict, bound with
    ``tune.with_parameters``) with the trial's draws ``config`` applied.

    The run goes through :func:`edrop_ray.run.execute` like ``edrop-ray prune``, without the
    dense baseline, into a temporary run folder. Every generation is reported; every checkpoint
    the run writes is reported as a Tune checkpoint holding that folder (its ``checkpoint.pt``),
    and a restarted trial continues from it as ``edrop-ray resume`` does. The last report holds
    the final measurement, with the finished run folder (``mask.pt``) as its checkpoint."""
    import torch
    from ray import tune

    from .data import load_for
    from .devices import cpu_threads, worker_device
    from .job import check_streams
    from .memory import keep_heap_memory
    from .run import RunSpec, execute

    cfg = trial_config(base, config)
    keep_heap_memory()  # a trial's process is Ray's worker, the tool's own
    torch.set_num_threads(cpu_threads(cfg.cpu_threads, _trial_cpus(cfg)))
    data = load_for(cfg)
    last: dict[str, Any] = {}

    def metrics(record: dict[str, Any]) -> dict[str, Any]:
        keys = ("generation", "step", "best_energy", "mean_energy", "kept_fraction")
        keys += ("diversity", "train_loss", "frozen")
        return {k: record[k] for k in keys}

    def on_generation(record: dict[str, Any]) -> None:
        last.clear()
        last.update(metrics(record))
        tune.report(dict(last))

    def on_checkpoint(run_dir: Path, step: int) -> None:
        if not last:
            return  # dense warm-up: no generation yet, so no metric to report with it
        last["step"] = step
        tune.report(dict(last), checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        blob = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as saved:
                blob = store.load_checkpoint(Path(saved))  # as resume loads it
                check_streams(blob, Path(saved))
            if blob["history"]:
                last.update(metrics(blob["history"][-1]))
                last["step"] = int(blob["learner"]["step"])
        device = worker_device(cfg.device)
        spec = RunSpec(
            cfg,
            data,
            device,
            run_dir,
            checkpoint=blob,
            quiet=True,
            dense=False,  # a trial trains no dense model of its own
            on_generation=on_generation,
            on_checkpoint=on_checkpoint,
        )
        outcome = execute(spec)
        report = outcome.report
        result = {
            **last,
            "step": report["steps"],
            "generation": report["generations"],
            **outcome.measured,
            "converged_at": -1 if report["converged_at"] is None else report["converged_at"],
        }
        # the finished run folder (mask.pt among its files) is the trial's last checkpoint
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))


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
    trials = samples * grid_size(checked)
    use_asha = scheduler == "asha" or (scheduler == "auto" and trials >= REDUCTION_FACTOR)
    if cfg.backend != "local" and not quiet:
        print("edrop-ray: note: sweep trials run EDropout in process (backend=local); the "
              "parallelism is across trials", file=sys.stderr)  # fmt: skip

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = connect_ray(
        cfg.ray_address,
        num_cpus=os.cpu_count() or 1,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
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
    rows = trial_rows(results, keys)
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
    store.write_atomic(path / "sweep.md", sweep_markdown(rows, _RANKING).encode())
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
        print(sweep_markdown(rows, _RANKING))
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
