"""Adding and draining instances on a running deployment, under load: no request is lost, cut
or changed (greedy outputs equal the single-process engine's), new instances take requests, and
drained ones are gone. Planner-driven scaling on Ray's autoscaler is test_autoscaling_cluster.py."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.instance_actors import instance_actor_name

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [f"def function_{i}(x):\n    return x * {i} + " for i in range(36)]


@pytest.fixture(scope="module")
def cluster(serving_cluster):
    """The session's 1+1 cluster (its other users ran before: these tests leave it at 1+1)."""
    status = serving_cluster.scale_to(1, 1)
    assert status.running == {"prefill": ["prefill-0"], "decode": ["decode-0"]}
    return serving_cluster


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def _alive(cluster: Cluster, instance_id: str) -> bool:
    try:
        ray.get_actor(instance_actor_name(instance_id), namespace=cluster.config.namespace)
    except ValueError:
        return False
    return True


def test_scale_up_then_drain_under_load_loses_no_request(cluster):
    reference = {out.prompt: out.token_ids for out in LLM().generate(PROMPTS, PARAMS)}

    async def run():
        first = [asyncio.ensure_future(cluster.agenerate(p, PARAMS)) for p in PROMPTS[:12]]
        up = await asyncio.to_thread(cluster.scale_to, 2, 2)
        second = [asyncio.ensure_future(cluster.agenerate(p, PARAMS)) for p in PROMPTS[12:]]
        await asyncio.sleep(0.05)  # some of the second wave reaches the new instances
        down = asyncio.ensure_future(asyncio.to_thread(cluster.scale_to, 1, 1))
        outputs = await asyncio.gather(*first, *second)
        return up, await down, outputs

    up, down, outputs = asyncio.run(run())
    assert up.running == {"prefill": ["prefill-0", "prefill-1"], "decode": ["decode-0", "decode-1"]}
    # The newest of each role was drained, then removed and killed.
    assert down.running == {"prefill": ["prefill-0"], "decode": ["decode-0"]}
    assert down.starting == down.draining == {"prefill": [], "decode": []}
    assert not _alive(cluster, "prefill-1") and not _alive(cluster, "decode-1")
    assert _alive(cluster, "prefill-0") and _alive(cluster, "decode-0")
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert (out.finish_reason, out.error, out.attempts) == ("length", None, 1), prompt
        assert out.token_ids == reference[prompt], prompt
    used = {(o.prefill_instance, o.decode_instance) for o in outputs}
    assert {p for p, _ in used} == {"prefill-0", "prefill-1"}
    assert {d for _, d in used} == {"decode-0", "decode-1"}
    # The timeline holds each change of the counts.
    counts = [(e.num_prefill, e.num_decode) for e in down.timeline]
    assert counts == [(1, 1), (2, 2), (1, 1)]
    # The deployment still serves, on what is left.
    after = cluster.generate(PROMPTS[:2], PARAMS)
    assert [o.token_ids for o in after] == [reference[p] for p in PROMPTS[:2]]
    assert {o.prefill_instance for o in after} == {"prefill-0"}


def test_scale_to_checks_its_counts_before_any_work(cluster):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="num_decode: expected a positive integer"):
            cluster.scale_to(1, bad)
    for bad in (float("nan"), float("inf"), 0, True):
        with pytest.raises(ValueError, match="timeout_s: expected a finite number > 0"):
            cluster.scale_to(1, 1, timeout_s=bad)
    assert cluster.scaling_status().running == {"prefill": ["prefill-0"], "decode": ["decode-0"]}


def test_a_restarted_autoscaler_and_conductor_keep_the_added_instances(cluster):
    added = cluster.scale_to(2, 1).running["prefill"][-1]
    # The autoscaler restarts and takes the instances over from the conductor.
    old_pid = _pid(cluster.autoscaler)
    ray.kill(cluster.autoscaler, no_restart=False)
    deadline = time.monotonic() + 60
    while _pid(cluster.autoscaler) == old_pid and time.monotonic() < deadline:
        time.sleep(0.5)  # calls wait for the restart; the kill itself is asynchronous
    status = cluster.scaling_status()
    assert status.running == {"prefill": ["prefill-0", added], "decode": ["decode-0"]}
    # The conductor restarts knowing only the instances it was created with; the autoscaler's
    # next round adds the new one back, and requests reach it again.
    old_pid = _pid(cluster.conductor)
    ray.kill(cluster.conductor, no_restart=False)
    deadline = time.monotonic() + 60
    known: dict = {}
    while time.monotonic() < deadline:
        # Calls wait for the restart (max_task_retries); the kill itself is asynchronous.
        if _pid(cluster.conductor) != old_pid:
            known = ray.get(cluster.conductor.instances.remote())
            if added in known:
                break
        time.sleep(0.5)
    assert set(known) == {"prefill-0", added, "decode-0"}
    # New prompts (the rebuilt conductor knows prefill-0 caches the earlier ones).
    fresh = [f"class Widget{i}:\n    def render(self, size):\n        " for i in range(12)]
    outputs = cluster.generate(fresh, PARAMS)
    assert {o.finish_reason for o in outputs} == {"length"}
    assert {o.prefill_instance for o in outputs} == {"prefill-0", added}
    # Both restart at once: the conductor forgets the added instance and the autoscaler cannot
    # learn it from the conductor; it finds it by name, adopts it and re-adds it.
    pids = (_pid(cluster.autoscaler), _pid(cluster.conductor))
    ray.kill(cluster.autoscaler, no_restart=False)
    ray.kill(cluster.conductor, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        restarted = _pid(cluster.autoscaler) != pids[0] and _pid(cluster.conductor) != pids[1]
        if restarted and added in ray.get(cluster.conductor.instances.remote()):
            break
        time.sleep(0.5)
    assert _pid(cluster.autoscaler) != pids[0] and _pid(cluster.conductor) != pids[1]
    assert added in ray.get(cluster.conductor.instances.remote())
    assert cluster.scaling_status().running["prefill"] == ["prefill-0", added]
    # And it can still drain what it took over.
    status = cluster.scale_to(1, 1)
    assert status.running == {"prefill": ["prefill-0"], "decode": ["decode-0"]}
    assert not _alive(cluster, added)
