"""Every KV transfer backend carries the prompt's KV from prefill to decode without changing a token."""

from __future__ import annotations

import importlib.util

import pytest

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):"]


@pytest.mark.parametrize("backend", ["object_store", "ray_direct", "mooncake"])
def test_backend_serves_identical_tokens(ray_session, backend):  # noqa: F811
    if backend == "mooncake" and importlib.util.find_spec("mooncake") is None:
        pytest.skip("mooncake-transfer-engine-non-cuda is not installed")
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace=f"raycake-test-{backend}", transfer_backend=backend, num_store_shards=0
        )
    )
    params = SamplingParams(temperature=0, max_tokens=16)
    try:
        outputs = cluster.generate(PROMPTS, params)
    finally:
        cluster.shutdown()
    expected = LLM().generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    assert all(o.kv_bytes > 0 for o in outputs)
