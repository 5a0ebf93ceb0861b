"""bn_recalibrate: BatchNorm statistics re-estimated under the final mask."""

from __future__ import annotations

from pathlib import Path

import torch

from edrop_ray.config import load_config
from edrop_ray.data import load_for
from edrop_ray.learner import Learner

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def test_recalibrated_statistics_are_the_masked_batch_averages():
    cfg = load_config(TINY, ["bn_recalibrate=3"])
    train_set, _test, info = load_for(cfg)
    learner = Learner(cfg, train_set, info, torch.device("cpu"))
    for _ in range(3):
        learner.train(None)
    d = learner.units.num_units
    state = torch.rand(d, generator=torch.Generator().manual_seed(4)) < 0.5
    model = learner.model
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}

    # What the second BatchNorm of the first block sees, with the state applied, batch by batch.
    bn = model.layer1[0].bn2
    inputs = []
    handle = bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    used = learner.recalibrate_bn(state, 3)
    handle.remove()
    assert used == 3 and len(inputs) == 3
    x = torch.cat(inputs)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    masked_mean = bn.running_mean.clone()
    # An upstream unit was switched off, so these are not the dense statistics.
    learner.recalibrate_bn(torch.ones(d, dtype=torch.bool), 3)
    assert not torch.allclose(bn.running_mean, masked_mean, atol=1e-3)
    assert model.training and bn.momentum == 0.1, "modes and momentum are restored"
    for k, v in model.state_dict().items():  # only running statistics changed
        if k in weights:
            assert torch.equal(v, weights[k]), k
