"""Typed, frozen run configuration: YAML files plus ``--set key=value`` overrides, validated.

One flat dataclass keeps ``--set`` simple (``--set population_size=32``). Unknown keys are
rejected with the list of valid ones; values keep the type of the field they set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .imports import is_import_path, module_file
from .validation import validate

__all__ = [
    "Config",
    "load_config",
    "parse_override",
    "config_to_dict",
    "config_from_dict",
    "dense_key",
    "validate",
    "read_yaml",
]


@dataclass(frozen=True)
class Config:
    """Every setting of a run. The defaults are the embedded demo (configs/digits_resnet18.yaml):
    digits, ResNet-18, about 3 minutes on 2 CPUs."""

    # --- data and model
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    input_size: int = 32
    model: str = "resnet18"  # a torchvision classifier's name, or package.module:callable
    small_input: bool = True  # 3x3 stride-1 stem for 28-32 px inputs
    init_weights: str = ""  # a state_dict file loaded before pruning (and before the dense run)
    # --- training
    epochs: int = 5
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    lr_schedule: str = "constant"  # constant | cosine: lr * 0.5 * (1 + cos(pi * t / T)) before
    # optimiser step t of T = total_steps (dense baseline and compare's arms too; compare's
    # fine-tuning of the pruned baselines keeps a constant lr)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 (CUDA autocast)
    channels_last: bool = False
    # --- population search (EDropout)
    population_size: int = 8  # S; the paper grid configs use 16
    p0: float = 0.5
    mutation: str = "logical"  # logical | sigmoid
    F: float = 0.9
    CR: float = 0.7
    kappa: float = 10.0
    sparsity_lambda: float = 0.0
    target_prune_rate: float | None = None  # hard budget on the kept-unit fraction
    # budgets as fractions of the dense model to keep, exact on the slimmed model (budget.py)
    target_params: float | None = None  # hard: every state keeps <= this fraction of params
    target_macs: float | None = None  # hard: every state keeps <= this fraction of MACs
    macs_lambda: float = 0.0  # energy penalty macs_lambda * macs(state) / macs(dense)
    energy_batch_size: int = 32
    energy_source: str = "train"  # train (the paper) | heldout: energy batches come only from a
    # fixed, seeded heldout_fraction of the training set that no training step ever uses; the
    # training order (steps per epoch, so total_steps) then covers only the remaining part, for
    # the dense baseline and compare's arms as well
    heldout_fraction: float = 0.1  # of the training set, floored; with energy_source: heldout
    train_state: str = "best"  # best (the paper) | sampled: until the freeze, each step trains
    # a member drawn by energy, softmax(-standardised energy); backend local only, not resumable
    energy_bn: str = "running"  # running (the paper: BN in inference mode) | batch (each
    # candidate's replica normalised on its own batch statistics; backend local only)
    states_per_pass: int = 0  # candidates per forward pass; 0 = auto (GPU: all 2S at once)
    evolve_every: int = 3  # training steps between generations
    warmup_steps: int = 0  # dense steps (no mask) before the first generation, which runs at
    # step warmup_steps; counted in the budget (total_steps is unchanged), so < total_steps
    diversity_threshold: float = 0.02
    patience: int = 10  # freeze when the best state is unchanged this many generations
    max_generations: int = 0  # 0 = no cap besides the training budget
    snapshot_every: int = 5  # population snapshots to population.parquet
    bn_recalibrate: int = 0  # training batches to re-estimate BN statistics under the final mask
    probe_members: int = 0  # diagnostics: K fixed random states (stream "probe", keep probability
    # p0), judged at every generation on its weights and batch; history gets probe_energy (their
    # mean) and probe_gap (probe_energy - best_energy). The search is unchanged; local backend only
    # --- distributed runtime (Ray)
    backend: str = "ray"  # ray (a local instance when no cluster is given) | local (in process)
    num_evaluators: int = 0  # 0 = one per GPU, else min(2, CPUs)
    gpus_per_evaluator: float = -1.0  # -1 = auto: 1 on a multi-GPU cluster, 0.5 on one GPU, else 0
    cpus_per_evaluator: float = 1.0
    trainer_gpus: float = -1.0  # -1 = auto, like gpus_per_evaluator
    trainer_cpus: float = 0.0  # 0 = auto: every core when Ray is started here, else 2
    cpu_threads: int = 0  # torch threads per process; 0 = the CPUs Ray gives it (torch's default
    # in process). Set it for bit-identical CPU results across backends: float sums depend on it.
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    weights_every: int = 1  # staleness k: evaluators see weights at most k steps old
    pipeline: bool = False  # judge a generation while the trainer takes its step (README: Ray)
    generation_timeout_s: float = 120.0
    checkpoint_every: int = 10  # generations between checkpoints; 0 = only at the end
    ray_address: str = ""  # empty = attach to a running cluster/job, else start a local one
    ray_connect_timeout_s: float = 10.0  # how long a given ray_address may take to answer
    # --- weights from the trainer to the evaluators (Ray backend)
    weights_transport: str = "auto"  # auto (collective where one forms) | collective | object_store
    weights_dtype: str = "fp32"  # fp32 (exact) | bf16 (half the bytes; energies move, see README)


# Fields that change what a dense baseline learns: the key of its cache.
_DENSE_FIELDS = (
    "dataset", "data_root", "input_size", "model", "small_input", "epochs", "batch_size",
    "lr", "momentum", "weight_decay", "seed", "amp", "channels_last", "cpu_threads", "device",
)  # fmt: skip
# Later fields that change what it learns, in the key only when not at their default, so the
# keys (and the cached baselines) of configs that leave them alone stay what they were.
_DENSE_FIELDS_IF_SET = ("energy_source", "heldout_fraction", "lr_schedule")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def show(value: Any) -> str:
    """A short repr for messages: bounded however large or deeply nested ``value`` is (an
    alias bomb is a few references deep, but expands to billions of items)."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(Config)}


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` to the declared type of ``key``; raise UserError when it does not fit."""
    kind = _field_types()[key]
    if value is None and "None" in str(kind):
        return None
    if isinstance(value, str) and value.lower() in ("null", "none") and "None" in str(kind):
        return None
    base = str(kind).split("|")[0].strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base == "int":
            if isinstance(value, str):
                text = value.strip()
                try:
                    return int(text)
                except ValueError:
                    value = float(text)  # 1e9 is a string to YAML 1.1; accept it when whole
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise UserError(
        f"{key} must be {base}, got {show(value)}; e.g. --set {key}={_example(key, base)}"
    )


def _example(key: str, base: str) -> str:
    default = getattr(Config(), key)
    if default is not None and default != "":
        return str(default).lower() if isinstance(default, bool) else str(default)
    return {"bool": "true", "int": "3", "float": "0.5"}.get(base, "name")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` from ``--set``; the value is read as YAML (so 3, 0.5, true, null)."""
    if "=" not in text:
        raise UserError(f"--set needs key=value, got {text!r}; e.g. --set population_size=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_keys(values: dict[Any, Any], source: str) -> None:
    valid = _field_types()
    for key in values:
        if not isinstance(key, str):
            raise UserError(f"{source}: key {show(key)} is not a name; keys are names such as "
                            "population_size")  # fmt: skip
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UserError(
            f"unknown config key {unknown[0]!r} in {source}; valid keys: {', '.join(valid)}"
        )


def config_from_dict(values: Any, source: str) -> Config:
    """A validated Config from a plain mapping (a YAML file's, a checkpoint's); UserError if not."""
    if not isinstance(values, dict):
        raise UserError(f"{source} must hold a mapping of key: value, got {type(values).__name__}")
    _check_keys(values, source)
    return validate(Config(**{k: _coerce(k, v) for k, v in values.items()}))


def read_yaml(p: Path, what: str, flag: str) -> Any:
    """safe_load of a small text file; every way it can fail is one UserError line."""
    if not p.is_file():
        raise UserError(f"{what} file {str(p)!r} not found; pass an existing {flag} FILE")
    try:
        text = p.read_text()
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError(f"{what} file {str(p)!r} is not a text file; pass a YAML {flag}") from None
    except OSError as e:
        raise UserError(f"{what} file {str(p)!r} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} file {str(p)!r} is not valid YAML: {first}") from None
    except RecursionError:
        raise UserError(f"{what} file {str(p)!r} is nested too deeply to be a {what}") from None


# Named presets: settings applied after the YAML config and before --set (``--preset NAME``).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's procedure exactly (Salehinejad & Valaee, TNNLS 2022; DESIGN.md section 1): a
    # generation before every training step, S = 16 from p0 = 0.5, the logical mutation at
    # F = 0.9 and CR = 0.7, energies on training batches with BatchNorm's running statistics,
    # training under the best state, a constant learning rate, no warm-up, penalty or
    # recalibration, nothing overlapped.
    "paper": {
        "evolve_every": 1,
        "population_size": 16,
        "p0": 0.5,
        "mutation": "logical",
        "F": 0.9,
        "CR": 0.7,
        "sparsity_lambda": 0.0,
        "energy_bn": "running",
        "energy_source": "train",
        "train_state": "best",
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "bn_recalibrate": 0,
        "pipeline": False,
    },
}


def preset_overrides(name: str | None) -> list[str]:
    """``key=value`` overrides of the preset ``name`` (none for None); one line if unknown."""
    if name is None:
        return []
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in PRESETS[name].items()]


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    names: bool = True,
) -> Config:
    """Read a YAML config (optional), apply ``key=value`` overrides, validate, return it."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "config", "--config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(p)!r} must hold a mapping of key: value")
        _check_keys(loaded, str(p))
        values.update({k: _coerce(k, v) for k, v in loaded.items()})
    for text in overrides:
        key, value = parse_override(text)
        _check_keys({key: value}, "--set")
        values[key] = _coerce(key, value)
    return validate(Config(**values), names=names)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dense_key(cfg: Config) -> str:
    """Key of the dense baseline's cache: a hash of the fields that change what it learns."""
    d = {k: getattr(cfg, k) for k in _DENSE_FIELDS}
    # Only when used, so the keys of runs without them stay as they were: the bytes of the
    # initial weights, and the source file of a user's model (its code may change, its name not).
    if cfg.init_weights:
        d["init_weights"] = _file_digest(Path(cfg.init_weights).expanduser())
    if is_import_path(cfg.model):
        d["model_source"] = _module_digest(cfg.model)
    defaults = Config()
    d.update({k: getattr(cfg, k) for k in _DENSE_FIELDS_IF_SET
              if getattr(cfg, k) != getattr(defaults, k)})  # fmt: skip
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path}"


def _module_digest(path: str) -> str:
    """The sha256 of an import path's source file (see imports.module_file)."""
    origin = module_file(path)
    return _file_digest(Path(origin)) if origin else f"unknown:{path}"
