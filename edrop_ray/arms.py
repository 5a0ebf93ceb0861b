"""The arms of ``edrop-ray compare`` (:mod:`edrop_ray.compare` runs them) and their budgets.

Every arm trains the same model on the same data with the same optimiser (:func:`build_optimizer`)
and the same seeded data order (:meth:`Learner.train_batch`). T is the configured budget
(``epochs`` x steps per epoch); f is the number of steps EDropout trained its final mask (see
"Fine-tuning budget" below).

* **dense**: the unpruned model trained T steps, as the dense baseline of
  :func:`edrop_ray.job.dense_baseline` is (its cache entry is filled from this run, so the EDropout
  jobs below do not train the same model a second time).
* **edropout**: a whole EDropout run, :func:`edrop_ray.job.prune` into ``OUT/edropout`` with the
  config as given (``backend`` included: ``--set backend=local`` runs it in process). T steps.
* **magnitude**: group-L1 magnitude pruning of a dense model to EDropout's parameter count, then
  fine-tuning f steps.
* **random**: the same with a random (seeded) order of the units.
* **random-mask**: the control for the search. A random state with EDropout's parameter count
  (the random order of **random**, fitted on the untrained model: parameter counts do not depend
  on the weights), fixed from step 0 and trained T steps masked, exactly as EDropout trains its
  final mask.
* **edropout-s4**: EDropout with the smallest population binary DE is defined for. S = 1 is not
  EDropout: the mutation needs three members distinct from each other and from the target
  (``population_size >= 4`` in the config), and with one member selection compares a state only
  with its own mutant. S = 4 keeps the whole procedure (same code path, same seed) with the least
  search, so it asks "does a bigger population buy anything?" at equal steps.
* **frozen-first-gen**: EDropout stopped after its first generation (``max_generations=1``): the
  best of generation 1 (same seed, so the same first generation as **edropout**) trained from
  then on, T steps in all. It asks "does evolving past the first selection buy anything?".
* **paper-schedule** (only when ``--arms`` names it): EDropout with the paper's schedule, a
  generation at every training step (``evolve_every: 1``) and S = 16, T steps in all.

Budgets (``--budget``):

* ``equal-steps`` (default): every arm trains T steps in all. Magnitude and random pruning start
  from a dense model trained T - f steps (the same seed and data order as the dense arm, so it is
  the dense arm's model at step T - f), are pruned, then fine-tuned f steps.
* ``equal-finetune``: magnitude and random pruning start from the dense arm's model trained T
  steps and are fine-tuned f steps: T + f steps in all (the behaviour before ``--budget``).

Step counts are counted, not derived: a global optimiser step hook counts the optimiser steps
each arm really takes in this process (``train_steps``; with ``backend=ray`` EDropout trains in
an actor, so its count is the run's own step counter and ``steps_counted`` is false).

Ranking and parameter budget: the baselines rank, remove and fit units as
:mod:`edrop_ray.baselines` describes (group L1 via Torch-Pruning, a seeded random order, bisection
to EDropout's ``params_pruned``).

Fine-tuning budget. EDropout trains its final mask from the training step at which the last
generation ran (when it froze, or, if it never froze, the last generation before the budget ran
out: the best state does not change after it) to the end of the budget: ``f = total_steps -
(history[-1].step - 1)`` (a history row's ``step`` is counted after the generation's training
step). Each baseline is fine-tuned for exactly f steps, on the very batches EDropout trained its
final mask on (steps ``T - f .. T - 1`` of the seeded data order), with a fresh optimiser of the
same settings.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "METHODS",
    "DEFAULT_ARMS",
    "REQUIRED",
    "BUDGETS",
    "OUTPUTS",
    "EDROPOUT_DIR",
    "RUN_ARMS",
    "finetune_budget",
]

METHODS = (
    "dense", "edropout", "magnitude", "random", "random-mask", "edropout-s4", "frozen-first-gen",
    "paper-schedule",
)  # fmt: skip
# paper-schedule costs S = 16 energies at every step: it runs when --arms names it
DEFAULT_ARMS = tuple(m for m in METHODS if m != "paper-schedule")
REQUIRED = ("dense", "edropout")  # every other arm is measured against these two
BUDGETS = ("equal-steps", "equal-finetune")
OUTPUTS = ("compare.json", "compare.md", "accuracy_vs_params.png")
EDROPOUT_DIR = "edropout"
# arms that are whole EDropout runs: (run folder, config changes)
RUN_ARMS = {
    "edropout": (EDROPOUT_DIR, {}),
    "edropout-s4": ("edropout-s4", {"population_size": 4}),
    "frozen-first-gen": ("frozen-first-gen", {"max_generations": 1}),
    "paper-schedule": ("paper-schedule", {"evolve_every": 1, "population_size": 16}),
}


def finetune_budget(history: list[dict[str, Any]], total_steps: int) -> tuple[int, int]:
    """(start, steps): EDropout trained its final mask on steps ``start .. total_steps - 1``.

    ``start`` is the step of the last generation (a history row's ``step`` is counted after the
    training step that follows its generation); no generation at all means the whole budget.
    """
    start = int(history[-1]["step"]) - 1 if history else 0
    start = min(max(start, 0), total_steps)
    return start, total_steps - start
