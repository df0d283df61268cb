"""Hot KV blocks get a replica on the next shard, and reads survive the loss of a shard."""

from __future__ import annotations

import ray

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PREFIX = "import json\nimport os\n\n\nclass Settings:\n    def __init__(self, path):\n        self.path = path\n"
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_reads_fall_back_to_replicas_when_a_shard_dies(ray_session):  # noqa: F811
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace="raycake-test-replicas",
            num_store_shards=2,
            store_replicate_after_reads=1,
            actor_max_restarts=0,
        )
    )
    try:
        cluster.generate([PREFIX + "    pass\n"], GREEDY)
        cluster.reset_prefix_cache()
        # A store read makes every block it returns hot: each gets a copy on the other shard.
        read = cluster.generate([PREFIX + "    x = 1\n"], GREEDY)[0]
        assert read.num_store_blocks > 0
        stats = ray.get([s.stats.remote() for s in cluster.store_shards])
        # Both shards now hold every block read: its primary copy and the other's replica.
        assert all(st.num_blocks >= read.num_store_blocks for st in stats)
        cluster.reset_prefix_cache()
        ray.kill(cluster.store_shards[0], no_restart=True)
        prompt = PREFIX + "    y = 2\n"
        after = cluster.generate([prompt], GREEDY)[0]
    finally:
        cluster.shutdown()
    # Every block of the prefix still came from the store: shard 1's own and shard 0's replicas.
    assert after.finish_reason == "length"
    assert after.num_store_blocks == read.num_store_blocks
    assert after.token_ids == LLM().generate([prompt], GREEDY)[0].token_ids
