"""examples/prune_trained_torchvision.py on its tiny setting: a torchvision model trained dense,
saved, pruned from those weights to half its MACs, reloaded, measured again and exported."""

from __future__ import annotations

import torch
from example_module import load_example

from edrop_ray.slim import count_params_macs


def test_trained_torchvision_example_prunes_to_half_the_macs_and_exports(tmp_path):
    example = load_example("prune_trained_torchvision.py", "prune_trained_torchvision")
    got = example.main(["--tiny", "--out", str(tmp_path)])
    report = got["report"]
    assert report["target_macs"] == 0.5
    assert got["macs"] == report["macs_pruned"] <= 0.5 * report["macs_dense"]
    assert got["dense_macs"] == report["macs_dense"]
    weights = torch.load(tmp_path / "resnet18_digits.pt", weights_only=True)
    assert weights["conv1.weight"].shape == (64, 1, 3, 3)  # the adapted stem, trained and saved
    exported = torch.export.load(str(tmp_path / "resnet18_pruned.pt2")).module()
    x = torch.zeros(2, 1, 8, 8)
    assert exported(x).shape == (2, 10)
    # the budget is relative to the dense ResNet-18 of the example, measured at the same size
    dense = example.make_resnet18()
    assert count_params_macs(dense, x[:1])[1] == report["macs_dense"]
