"""Validation of a run's :class:`~edrop_ray.config.Config`: ranges, choices and names.

Every check raises :class:`~edrop_ray.errors.UserError` naming the key and a value that works.
The allowed values of the choice keys are the table :data:`CHOICES`; those of ``mutation`` are
the registry of :mod:`edrop_ray.population` (see :func:`mutation_names`).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

from .errors import UserError
from .imports import check_import_path, is_import_path

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "validate",
    "mutation_names",
    "CHOICES",
    "BUILTIN_MUTATIONS",
    "MAX_POPULATION",
    "MAX_INPUT_SIZE",
]

# Upper bounds that keep a typo from asking for terabytes (see validate).
MAX_POPULATION = 4096
MAX_INPUT_SIZE = 1024
_INT64 = 2**63
# The operators edrop_ray.population registers itself: known before torch is imported.
BUILTIN_MUTATIONS = ("logical", "sigmoid")


def mutation_names() -> tuple[str, ...]:
    """The values ``mutation`` may take: the registered mutation operators."""
    # Operators registered with edrop_ray.population.register_mutation count once that module is
    # loaded (a user's own code registers before it builds a config); the CLI checks its input
    # before torch is imported, so it knows the built-in ones.
    population = sys.modules.get("edrop_ray.population")
    return population.mutations() if population is not None else BUILTIN_MUTATIONS


CHOICES = {
    "device": None,  # validated by pattern below
    "amp": ("none", "bf16"),
    "mutation": None,  # the registry of edrop_ray.population, see mutation_names
    "energy_bn": ("running", "batch"),
    "energy_source": ("train", "heldout"),
    "lr_schedule": ("constant", "cosine"),
    "train_state": ("best", "sampled"),
    "backend": ("local", "ray"),
    "placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "weights_transport": ("auto", "collective", "object_store"),
    "weights_dtype": ("fp32", "bf16"),
}


def validate(cfg: Config, *, names: bool = True) -> Config:
    """Check ranges and choices; raise UserError naming the key and the fix.

    ``names=False`` leaves out the model and dataset names (their registries import
    torchvision); the CLI checks those after the output folder, which is checked without torch.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    defaults = type(cfg)()  # the Config defaults, named in the messages
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            need(False, f"{f.name} must be a finite number, got {v}; "
                        f"e.g. --set {f.name}={getattr(defaults, f.name)}")  # fmt: skip
        if isinstance(v, int) and not isinstance(v, bool) and not -_INT64 <= v < _INT64:
            need(False, f"{f.name} {v} does not fit in 64 bits; e.g. --set {f.name}="
                        f"{getattr(defaults, f.name)}")  # fmt: skip
    need(0 <= cfg.seed < _INT64, f"seed must be in [0, 2**63), got {cfg.seed}")
    need(cfg.population_size >= 4, f"population_size must be >= 4, got {cfg.population_size}")
    need(
        cfg.population_size <= MAX_POPULATION,
        f"population_size {cfg.population_size} is more than {MAX_POPULATION}: each member is a "
        "state of every unit and is judged on its own copy of the energy batch, so the memory it "
        "asks for grows with it (the paper uses 16-32); lower --set population_size",
    )
    need(
        cfg.input_size <= MAX_INPUT_SIZE,
        f"input_size {cfg.input_size} is more than {MAX_INPUT_SIZE} px: the images alone would "
        "not fit in memory; use 28-32 (224 for ImageNet-sized sets)",
    )
    need(0.0 <= cfg.momentum <= 1.0, f"momentum must be in [0, 1], got {cfg.momentum}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.kappa > 0, f"kappa must be > 0, got {cfg.kappa}")
    need(
        0.0 <= cfg.diversity_threshold <= 1.0,
        f"diversity_threshold must be in [0, 1], got {cfg.diversity_threshold}",
    )
    for key in ("generation_timeout_s", "ray_connect_timeout_s"):
        need(getattr(cfg, key) > 0, f"{key} must be > 0 seconds, got {getattr(cfg, key)}")
    for key in ("F", "CR", "p0"):
        v = getattr(cfg, key)
        need(0.0 <= v <= 1.0 and not math.isnan(v), f"{key} must be in [0, 1], got {v}")
    t = cfg.target_prune_rate
    need(
        t is None or (0.0 <= t < 1.0),
        f"target_prune_rate must be in [0, 1) or null, got {t}",
    )
    for key in ("target_params", "target_macs"):
        v = getattr(cfg, key)
        need(v is None or 0.0 < v <= 1.0, f"{key} must be in (0, 1] or null, got {v}")
    need(cfg.macs_lambda >= 0, f"macs_lambda must be >= 0, got {cfg.macs_lambda}")
    for key in ("epochs", "batch_size", "eval_batch_size", "energy_batch_size", "evolve_every",
                "patience", "input_size", "weights_every"):  # fmt: skip
        need(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)}")
    need(
        0.0 < cfg.heldout_fraction < 1.0,
        f"heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}; e.g. --set "
        "heldout_fraction=0.1",
    )
    for key in ("max_generations", "states_per_pass", "snapshot_every", "checkpoint_every",
                "num_evaluators", "warmup_steps"):  # fmt: skip
        need(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)}")
    need(cfg.sparsity_lambda >= 0, f"sparsity_lambda must be >= 0, got {cfg.sparsity_lambda}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    for key in ("gpus_per_evaluator", "trainer_gpus"):
        v = getattr(cfg, key)
        need(v == -1 or v >= 0, f"{key} must be >= 0, or -1 for auto; got {v}")
    need(
        cfg.cpus_per_evaluator > 0, f"cpus_per_evaluator must be > 0, got {cfg.cpus_per_evaluator}"
    )
    need(cfg.trainer_cpus >= 0, f"trainer_cpus must be >= 0 (0 = auto), got {cfg.trainer_cpus}")
    need(cfg.cpu_threads >= 0, f"cpu_threads must be >= 0 (0 = auto), got {cfg.cpu_threads}")
    need(
        cfg.bn_recalibrate >= 0, f"bn_recalibrate must be >= 0 (0 = off), got {cfg.bn_recalibrate}"
    )
    need(
        cfg.mutation in mutation_names(),
        f"mutation must be one of {', '.join(mutation_names())}, got {cfg.mutation!r}",
    )
    for key, choices in CHOICES.items():
        if choices:
            v = getattr(cfg, key)
            need(v in choices, f"{key} must be one of {', '.join(choices)}, got {v!r}")
    need(
        cfg.train_state == "best" or cfg.backend == "local",
        "train_state=sampled is implemented in process only; add --set backend=local",
    )
    need(
        0 <= cfg.probe_members <= 64,
        f"probe_members must be in [0, 64], got {cfg.probe_members}",
    )
    need(
        cfg.probe_members == 0 or cfg.backend == "local",
        "probe_members is implemented in process only; add --set backend=local",
    )
    need(
        cfg.energy_bn == "running" or cfg.backend == "local",
        "energy_bn=batch is implemented in process only; add --set backend=local",
    )
    need(
        cfg.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.device),
        f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )
    # An import path's syntax only: the import itself runs when the run starts (imports.py).
    for key in ("model", "dataset"):
        if is_import_path(getattr(cfg, key)):
            check_import_path(key, getattr(cfg, key))
    if not names:
        return cfg
    # last: the registries import torchvision, and every check above is answered without it
    from .data import DATASETS
    from .models import model_names

    need(
        is_import_path(cfg.model) or cfg.model in model_names(),
        f"unknown model {cfg.model!r}; choose a torchvision classifier (e.g. "
        f"{', '.join(model_names()[:7])}, mobilenet_v2) or package.module:callable",
    )
    need(
        is_import_path(cfg.dataset) or cfg.dataset in DATASETS,
        f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS)}, "
        "or package.module:callable",
    )
    return cfg
