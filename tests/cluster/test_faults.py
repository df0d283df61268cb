"""Actors killed under load: every request ends with its full text or a clear error, none is lost,
duplicated or spliced; a caller that goes away frees its blocks; bad requests fail before work."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest
import ray

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster, ClusterOutput
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PROMPT = "def fibonacci(n):"
PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):",
    "with open(path) as f:",
    "def main():\n    args = parse_args()",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
RANDOM = SamplingParams(max_tokens=32, ignore_eos=True)  # temperature 1, no seed: not replayable


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


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    outputs = LLM().generate(PROMPTS, GREEDY)
    return {p: o.token_ids for p, o in zip(PROMPTS, outputs, strict=True)}


async def _stream(cluster: Cluster, prompt: str, params: SamplingParams, log: list[list[int]]):
    final: ClusterOutput | None = None
    async for update in cluster.astream(prompt, params):
        log.append(list(update.token_ids))
        final = update
    return final


async def _load_with_a_kill(cluster: Cluster, victim) -> tuple[list[ClusterOutput], list]:
    """Six concurrent requests (greedy and random); ``victim`` is killed (and restarted by Ray)
    once the first request has streamed two tokens."""
    logs: list[list[list[int]]] = [[] for _ in PROMPTS]
    tasks = [
        asyncio.ensure_future(_stream(cluster, p, GREEDY if i % 2 == 0 else RANDOM, logs[i]))
        for i, p in enumerate(PROMPTS)
    ]
    deadline = time.monotonic() + 60
    while not any(len(log) >= 2 for log in logs) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    ray.kill(victim, no_restart=False)
    finals = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=240)
    return finals, logs


@pytest.mark.parametrize("victim", ["conductor", "prefill", "decode", "store"])
def test_an_actor_killed_under_load_loses_no_request(serving_cluster, reference, victim):
    cluster = serving_cluster
    actor = {
        "conductor": cluster.conductor,
        "prefill": cluster.prefill["prefill-0"],
        "decode": cluster.decode["decode-0"],
        "store": cluster.store_shards[0],
    }[victim]
    finals, logs = asyncio.run(_load_with_a_kill(cluster, actor))
    assert not [f for f in finals if not isinstance(f, ClusterOutput)], finals  # none lost
    for i, (final, log) in enumerate(zip(finals, logs, strict=True)):
        # What the caller saw only ever grew: never a token twice, never a spliced stream.
        for before, after in itertools.pairwise(log):
            assert after[: len(before)] == before
        if final.finish_reason == "error":
            assert final.error, final
            # Only a random request that had already streamed tokens may end this way.
            assert i % 2 == 1 and "cannot be replayed" in final.error, final.error
            continue
        assert final.finish_reason == "length", final
        assert len(final.token_ids) == GREEDY.max_tokens
        if i % 2 == 0:
            assert final.token_ids == reference[PROMPTS[i]]
    if victim in ("conductor", "store"):
        # Neither holds a request's tokens: nothing needed a retry that could fail.
        assert all(f.finish_reason == "length" for f in finals)
    # The instances hold nothing once every request is over.
    assert _settled(lambda: ray.get(cluster.decode["decode-0"].num_unfinished.remote()) == 0)
    assert _settled(lambda: ray.get(cluster.prefill["prefill-0"].num_unfinished.remote()) == 0)


def test_a_caller_that_goes_away_frees_blocks_on_every_instance(serving_cluster):
    cluster = serving_cluster
    decode, prefill = cluster.decode["decode-0"], cluster.prefill["prefill-0"]
    assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 0)
    decode_free = ray.get(decode.free_kv_blocks.remote())

    async def leave_after_three_updates():
        stream = cluster.astream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200))
        async with contextlib.aclosing(stream):
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    held = ray.get(decode.free_kv_blocks.remote())
                    return held

    held = asyncio.run(leave_after_three_updates())
    assert held < decode_free
    assert _settled(lambda: ray.get(decode.free_kv_blocks.remote()) == decode_free)
    assert ray.get(decode.num_unfinished.remote()) == 0
    assert ray.get(prefill.num_unfinished.remote()) == 0


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        (PROMPT, SamplingParams(max_tokens=4000), "max_tokens"),
        ([1, 2, 10**6], GREEDY, "prompt"),
        ([1, True, 3], GREEDY, "prompt"),
        (PROMPT, SamplingParams(top_k=10**9), "top_k"),
        (PROMPT, SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
        (None, GREEDY, "prompt"),
    ],
)
def test_bad_requests_fail_before_any_work(serving_cluster, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        serving_cluster.generate([PROMPT, prompt], params)
    with pytest.raises(ValueError, match=field):
        asyncio.run(serving_cluster.agenerate(prompt, params))


def _settled(check, timeout_s: float = 60.0) -> bool:
    """``check`` holds within the timeout (an actor still restarting counts as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ray.exceptions.RayError):
            if check():
                return True
        time.sleep(0.2)
    return False


pytestmark = pytest.mark.slow
