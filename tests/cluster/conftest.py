"""One serving cluster shared by the cluster tests that do not need a configuration of their own
(starting one costs about 15 s on two cores)."""

from __future__ import annotations

import pytest

from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture


@pytest.fixture(scope="session")
def serving_cluster(ray_session):  # noqa: F811
    """1 prefill, 1 decode, 1 store shard; restarts enough for every fault test to kill each."""
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace="raycake-test-serving",
            num_prefill=1,
            num_decode=1,
            num_store_shards=1,
            actor_max_restarts=8,
            request_max_retries=3,
        )
    )
    yield cluster
    cluster.shutdown()
