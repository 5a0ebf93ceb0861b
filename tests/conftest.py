"""Shared fixtures: the model grid at 32 px and an isolated dense-baseline cache."""

from __future__ import annotations

import os

import pytest
import torch

# Ray 2.60 turns token authentication on for local clusters; the tests' throwaway clusters on
# 127.0.0.1 turn it off explicitly (deploy manifests keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from edrop_ray.models import MODELS, build_model  # noqa: E402
from edrop_ray.units import discover_units  # noqa: E402

GRID = list(MODELS)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["EDROP_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


class _SharedRay:
    """The test session's one local Ray instance, with pinned resources (4 logical CPUs: two
    evaluators, the trainer and a spare), started by the first module that asks for it."""

    def __init__(self) -> None:
        self.started = False

    def start(self) -> str:
        import ray

        if not (self.started and ray.is_initialized()):
            from edrop_ray.cluster import start_private_instance

            start_private_instance(num_cpus=4)  # as edrop_ray starts its own
            self.started = True
        return ray.get_runtime_context().gcs_address

    def stop(self) -> None:
        if not self.started:
            return  # never imports Ray for modules that do not use it
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.started = False


@pytest.fixture(scope="session")
def _shared_ray():
    shared = _SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def ray_cluster(_shared_ray) -> str:
    """The session's shared Ray instance (its GCS address): modules that set
    ``SHARED_RAY = True`` use it, and it lives from the first of them to the end of the session."""
    return _shared_ray.start()


@pytest.fixture(autouse=True, scope="module")
def _ray_for_this_module(request, _shared_ray):
    # A module that starts a cluster of its own (several nodes, other resources) must find no
    # Ray running: the shared instance stops before it and starts again for the next user.
    if not getattr(request.module, "SHARED_RAY", False):
        _shared_ray.stop()


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so a channel that is not
    masked after its BN would show up as non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


@pytest.fixture(scope="module", params=GRID)
def grid_model(request):
    """(name, model, units, example batch) for each model of the grid, 32 px inputs."""
    name = request.param
    in_ch = 3 if name == "alexnet" else 1
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_ch)
    randomise_norms(model)
    x = torch.randn(2, in_ch, 32, 32, generator=torch.Generator().manual_seed(1))
    units = discover_units(model, x)
    return name, model, units, x


def pytest_sessionfinish(session, exitstatus):
    """End the compute threads the tests made in this process (trainers and evaluators built
    in place) before the interpreter's exit tears torch down around them."""
    from edrop_ray.devices import ComputeThread

    ComputeThread.close_all()
