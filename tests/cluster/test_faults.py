"""A decode instance killed mid-stream: the request is retried or fails visibly, never hangs."""

from __future__ import annotations

import asyncio

import pytest
import ray

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PROMPT = "def fibonacci(n):"
PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


async def _kill_decode_mid_stream(cluster: Cluster, no_restart: bool):
    updates = []
    killed = False
    async for update in cluster.astream(PROMPT, PARAMS):
        updates.append(len(update.token_ids))
        if not killed and len(update.token_ids) >= 4:
            ray.kill(cluster.decode["decode-0"], no_restart=no_restart)
            killed = True
    return update, updates


def test_killed_decode_instance_is_restarted_and_the_request_retried(ray_session):  # noqa: F811
    cluster = Cluster.from_config(
        ClusterConfig(namespace="raycake-test-retry", num_store_shards=0, actor_max_restarts=2)
    )
    try:
        final, seen = asyncio.run(
            asyncio.wait_for(_kill_decode_mid_stream(cluster, no_restart=False), timeout=120)
        )
    finally:
        cluster.shutdown()
    assert final.finish_reason == "length"
    assert final.attempts == 2
    # The caller never saw a token twice or out of order: lengths only grow.
    assert seen == sorted(seen)
    assert final.token_ids == LLM().generate(PROMPT, PARAMS)[0].token_ids


def test_killed_decode_instance_without_restarts_fails_clearly(ray_session):  # noqa: F811
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace="raycake-test-dead",
            num_store_shards=0,
            actor_max_restarts=0,
            request_max_retries=1,
        )
    )
    try:
        final, _ = asyncio.run(
            asyncio.wait_for(_kill_decode_mid_stream(cluster, no_restart=True), timeout=120)
        )
    finally:
        cluster.shutdown()
    assert final.finish_reason == "error"
    assert "instance failed" in final.error
    assert final.attempts == 2


pytestmark = pytest.mark.slow
