"""A Ray cluster of several nodes simulated on this host, for the tests of the ray executor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray
from ray.cluster_utils import Cluster


@contextmanager
def ray_cluster(nodes: int, cpus_per_node: int) -> Iterator[Cluster]:
    """A head and nodes - 1 more, each with `cpus_per_node` CPUs, this process connected as the driver. Its workers
    run at the tests' priority rather than Ray's default nice 15, which starves them on a busy host."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_worker_niceness", "0")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
