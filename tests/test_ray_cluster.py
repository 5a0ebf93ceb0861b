"""Placement across nodes: a head and two worker nodes with logical GPUs (ray.cluster_utils)."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from edrop_ray.config import load_config
from edrop_ray.data import load_datasets
from edrop_ray.distributed.runner import RayRuntime
from edrop_ray.learner import Learner
from edrop_ray.loop import run_edropout

pytestmark = pytest.mark.ray
TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_strict_spread_puts_one_evaluator_per_node_and_survives_losing_a_node(cluster):
    c, workers = cluster
    cfg = load_config(
        TINY,
        [
            "backend=ray", "num_evaluators=2", "gpus_per_evaluator=1", "trainer_gpus=0",
            "trainer_cpus=1", "placement_strategy=STRICT_SPREAD", "generation_timeout_s=20",
            "cpu_threads=1",
        ],
    )  # fmt: skip
    train_set, _test, info = load_datasets("digits", data_root=".", input_size=cfg.input_size)
    local = Learner(cfg, train_set, info, torch.device("cpu"))
    runtime = RayRuntime(cfg, info, local.units)
    removed = []
    try:
        nodes = [i["node_id"] for i in runtime.identities()]
        worker_ids = {w.node_id for w in workers}
        assert len(set(nodes)) == 2 and set(nodes) == worker_ids  # one per GPU node

        def drop_a_node(record):
            if record["generation"] == 2 and not removed:
                victim = next(w for w in workers if w.node_id == nodes[0])
                c.remove_node(victim)
                removed.append(victim.node_id)

        records = []
        run_edropout(
            runtime.learner,
            runtime.search,
            on_generation=lambda r: (records.append(r), drop_a_node(r)),
        )
        assert removed
        assert runtime.learner.step == runtime.learner.total_steps  # the run completed
        assert records[-1]["evaluators"] == 1  # and went on with the node that is left
        assert runtime.transport == "collective"  # gloo: the evaluators run on CPU here
        stats = ray.get(runtime.coordinator.stats.remote(), timeout=60)
        survivor = 1 - [i for i, n in enumerate(nodes) if n == removed[0]][0]
        assert stats["members"] == [survivor]  # the group was re-formed from the live rank
        assert stats["regroups"] >= 2
        assert runtime.search.best.dtype == torch.bool
    finally:
        runtime.shutdown()
