"""A multi-node run: a local two-node Ray cluster trains with one worker per node and gets the single-node result.
(This module sorts last in the folder: it stops the session's local Ray, which the other modules share.)"""

from __future__ import annotations

import pytest

from pipeline.config import load_pipeline_config
from tests.reliability.conftest import FAULT_TRAIN, assert_identical, comparable, write_params


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_two_node_cluster_one_worker_per_node_matches_single_node(tmp_path, toy_data, reference):
    """A local two-node Ray cluster (ray.cluster_utils.Cluster), one CPU per node, so each of the two one-CPU
    workers runs on its own node; gloo talks over loopback. Same result as the single-node reference."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.train import run_training

    ray.shutdown()  # the session's local Ray; later tests restart it through the local_ray fixture
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and all(n["Resources"].get("CPU") == 1 for n in nodes)
        out = run_training(load_pipeline_config(write_params(tmp_path, toy_data, train=FAULT_TRAIN)))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_identical(comparable(out), reference)
