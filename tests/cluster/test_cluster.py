"""The disaggregated cluster on a local Ray cluster, with the embedded model.

Prefill and decode instances, two KV store shards and the conductor are real Ray actors.
"""

from __future__ import annotations

import asyncio

import pytest

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig, TelemetryConfig
from raycake.policies.scheduling_config import SchedulingConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def push(self, item):",
    "import os\nimport sys\n\n\ndef main():\n",
]
GREEDY = SamplingParams(temperature=0, max_tokens=20)


@pytest.fixture(scope="module")
def cluster(ray_session):  # noqa: F811
    config = ClusterConfig(
        namespace="raycake-test",
        telemetry=TelemetryConfig(exporter="memory"),
        scheduling=SchedulingConfig(policy="cache_aware"),
    )
    cluster = Cluster.from_config(config)
    yield cluster
    cluster.shutdown()


def test_greedy_output_equals_the_single_instance_engine(cluster):
    outputs = cluster.generate(PROMPTS, GREEDY)
    expected = LLM().generate(PROMPTS, GREEDY)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.finish_reason == ref.finish_reason
        assert out.token_ids == ref.token_ids
        assert out.text == ref.text
        assert (
            out.kv_bytes > 0 and out.ttft_s is not None and len(out.tbt_s) == len(out.token_ids) - 1
        )


def test_seeded_sampling_survives_the_handoff(cluster):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16, ignore_eos=True)
    out = cluster.generate([PROMPTS[0]], params)[0]
    assert out.token_ids == LLM().generate([PROMPTS[0]], params)[0].token_ids


def test_same_prefix_is_served_from_the_store(cluster):
    shared = "import json\nimport os\n\n\ndef load_settings(path):\n    with open(path) as f:\n"
    first = cluster.generate([shared + "        return json.load(f)\n"], GREEDY)[0]
    assert first.num_store_blocks == 0
    # Empty the prefill instance's own cache: only the KV store still holds the prefix.
    cluster.reset_prefix_cache()
    prompt = shared + "        data = f.read()\n"
    second = cluster.generate([prompt], GREEDY)[0]
    num_prompt = len(second.prompt_token_ids)
    shared_blocks = len(cluster.tokenizer.encode(shared)) // cluster.block_size
    assert second.num_store_blocks >= shared_blocks > 0
    # The prefill instance computed only what the store did not hold.
    assert second.num_cached_tokens == second.num_store_blocks * cluster.block_size
    assert num_prompt - second.num_cached_tokens < num_prompt
    assert second.token_ids == LLM().generate([prompt], GREEDY)[0].token_ids


def test_one_trace_spans_the_request_stages(cluster):
    cluster.generate([PROMPTS[1]], GREEDY)
    driver = cluster.telemetry.finished_spans()
    prefill = asyncio.run(_spans(cluster.prefill["prefill-0"]))
    decode = asyncio.run(_spans(cluster.decode["decode-0"]))
    request = [s for s in driver if s["name"] == "request"][-1]
    trace = request["trace_id"]
    stages = {s["name"] for s in driver + prefill + decode if s["trace_id"] == trace}
    assert {"request", "conductor", "prefill", "transfer", "decode"} <= stages
    prefill_span = next(s for s in prefill if s["trace_id"] == trace)
    assert prefill_span["parent_id"] == request["span_id"]


async def _spans(actor) -> list[dict]:
    return await actor.finished_spans.remote()


def test_early_rejection_under_an_impossible_slo(ray_session):  # noqa: F811
    config = ClusterConfig(
        namespace="raycake-test-slo",
        num_store_shards=0,
        scheduling=SchedulingConfig(policy="cache_aware", ttft_slo_s=1e-6),
    )
    cluster = Cluster.from_config(config)
    try:
        out = cluster.generate([PROMPTS[0]], GREEDY)[0]
    finally:
        cluster.shutdown()
    assert out.finish_reason == "rejected"
    assert "TTFT" in out.error or "ttft" in out.error
    assert out.token_ids == []


def test_bad_cluster_config_names_the_field():
    with pytest.raises(ValueError, match=r"cluster\.num_prefill"):
        ClusterConfig(num_prefill=0)
    with pytest.raises(ValueError, match=r"cluster\.transfer_backend"):
        ClusterConfig(transfer_backend="carrier-pigeon")
    with pytest.raises(ValueError, match=r"scheduling\.policy"):
        ClusterConfig.from_dict({"scheduling": {"policy": "fastest"}})
