"""The pipeline rule of the in-process loop, with stand-ins that record what happens (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edrop_ray.config import Config
from edrop_ray.loop import run_edropout


class _Learner:
    def __init__(self, cfg: Config, total_steps: int):
        self.cfg, self.total_steps, self.step = cfg, total_steps, 0
        self.log: list[tuple[str, int, int]] = []  # (what, step, best generation used)

    def train(self, state: torch.Tensor) -> float:
        self.log.append(("train", self.step, int(state.sum())))
        self.step += 1
        return 0.0


class _Search:
    """Generation g's best state has g bits on, so a step's state says which generation made it."""

    def __init__(self, max_generations: int):
        self.frozen = False
        self.best = torch.zeros(8, dtype=torch.bool)
        self.generation, self.max_generations = 0, max_generations

    def run_generation(self, learner: _Learner) -> dict:
        learner.log.append(("judge", learner.step, self.generation))  # on W_step
        self.generation += 1
        self.best = torch.arange(8) < self.generation
        self.frozen = self.generation >= self.max_generations
        return {"generation": self.generation}


@pytest.mark.parametrize("evolve_every", [1, 2])
@pytest.mark.parametrize("pipeline", [False, True])
def test_pipeline_trains_step_t_with_the_best_from_before_its_generation(pipeline, evolve_every):
    cfg = dataclasses.replace(Config(), pipeline=pipeline, evolve_every=evolve_every)
    learner, search = _Learner(cfg, total_steps=8), _Search(max_generations=3)
    records = []
    run_edropout(learner, search, on_generation=records.append)
    judged = [(step, g) for what, step, g in learner.log if what == "judge"]
    trained = {step: g for what, step, g in learner.log if what == "train"}
    # the generations fall on the same steps and are judged on the same pre-step weights
    assert judged == [(0, 0), (evolve_every, 1), (2 * evolve_every, 2)]
    lag = 1 if pipeline else 0  # the step a generation falls on trains with the one before
    for step, g in judged:
        assert trained[step] == g + 1 - lag
        if step + 1 < 8 and (step + 1) % evolve_every:
            assert trained[step + 1] == g + 1  # the generation takes over from the next step
    assert trained[7] == 3  # the frozen best trains the rest
    assert [r["step"] for r in records] == [s + 1 for s, _ in judged]
