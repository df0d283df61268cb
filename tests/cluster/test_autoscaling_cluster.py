"""Planner-driven autoscaling on Ray's own autoscaler (``AutoscalingCluster``: fake nodes that
the real autoscaler v2 adds and removes). Prefill and decode instances ask for
``raycake_prefill`` / ``raycake_decode``, which only nodes of their worker type offer: a load
ramp makes the slo planner add instances and the autoscaler add nodes of each type for them;
idleness drains them, and the nodes go. No request is lost or cut on the way.

NOTE: marked ``stops_ray`` (runs last): ``AutoscalingCluster`` runs ``ray stop --force``."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from raycake import LLM, SamplingParams
from raycake.actors.calibration import calibrate
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from raycake.engine.config import EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.policies.planner import PlannerConfig
from raycake.policies.scheduling_config import SchedulingConfig
from tests.autoscaling_cluster import LocalAutoscalingCluster

pytestmark = pytest.mark.stops_ray

ROLES = {"prefill": "raycake_prefill", "decode": "raycake_decode"}
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
NUM_CLIENTS = 40
LOAD_TIMEOUT_S = 150.0  # the ramp lasts until each role has a second instance serving
IDLE_TIMEOUT_S = 90.0
PROMPT_TOKENS = 48  # about a ramp prompt's length


def _worker_type(resource: str) -> dict:
    return {
        "resources": {"CPU": 1, resource: 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    }


@pytest.fixture(scope="module")
def autoscaling_ray():
    if ray.is_initialized():
        ray.shutdown()  # the session's local cluster: `ray stop --force` ends it anyway
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={f"{role}_node": _worker_type(r) for role, r in ROLES.items()},
        autoscaler_v2=True,
        idle_timeout_minutes=0.05,  # an idle node goes after 3 s
    )
    cluster.start()
    try:
        ray.init(address="auto", namespace="raycake-autoscaling", logging_level="ERROR")
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def _nodes() -> dict[str, int]:
    """Alive nodes offering each role's resource."""
    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return {role: sum(r in res for res in alive) for role, r in ROLES.items()}


def _ttft_slo_s() -> float:
    """A TTFT SLO ten prefills of a ramp prompt long, from a cost model calibrated here as the
    instances calibrate theirs (one torch thread): a queue of the ramp's prefills exceeds it,
    an idle instance (one prefill: 0.1x) stays far below the 0.3x scale-down threshold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost_model = calibrate(LLMEngine(EngineConfig()))
    finally:
        torch.set_num_threads(threads)
    return 10 * cost_model.prefill_seconds(PROMPT_TOKENS, 0)


def test_load_ramp_adds_instances_and_nodes_and_idleness_removes_them(autoscaling_ray):
    config = ClusterConfig(
        namespace="raycake-autoscaling",
        num_prefill=1,
        num_decode=1,
        num_store_shards=1,
        prefill_resources={"raycake_prefill": 1},
        decode_resources={"raycake_decode": 1},
        planner=PlannerConfig(
            name="slo", max_prefill=2, max_decode=2, cooldown_s=2.0, down_stable_s=4.0
        ),
        planner_interval_s=0.5,
        # The predicted TTFT comes from the cost model and the conductor's queue, not the
        # clock. A TBT SLO any batch exceeds: decode scales on the ramp, and down when idle.
        scheduling=SchedulingConfig(
            ttft_slo_s=_ttft_slo_s(), tbt_slo_s=0.002, enable_early_rejection=False
        ),
    )
    cluster = Cluster(config)
    try:
        # Each instance waited for a node of its type.
        assert _nodes() == {"prefill": 1, "decode": 1}
        prompts: list[str] = []
        outputs = []
        peak_nodes = {"prefill": 1, "decode": 1}

        async def client(i: int, stop: asyncio.Event) -> None:
            while not stop.is_set():
                prompt = f"def client_{i}_{len(prompts)}(x):\n    return x + " * 3
                prompts.append(prompt)
                outputs.append(await cluster.agenerate(prompt, PARAMS))

        async def ramp() -> None:
            stop = asyncio.Event()
            clients = [asyncio.ensure_future(client(i, stop)) for i in range(NUM_CLIENTS)]
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                for role, count in _nodes().items():
                    peak_nodes[role] = max(peak_nodes[role], count)
                served = {o.prefill_instance for o in outputs} | {
                    o.decode_instance for o in outputs
                }
                if {"prefill-1", "decode-1"} <= served:
                    break
            stop.set()
            await asyncio.gather(*clients)

        asyncio.run(ramp())
        timeline = cluster.scaling_status().timeline
        assert max(e.num_prefill for e in timeline) == 2, timeline
        assert max(e.num_decode for e in timeline) == 2, timeline
        assert peak_nodes == {"prefill": 2, "decode": 2}
        served = {o.prefill_instance for o in outputs} | {o.decode_instance for o in outputs}
        assert {"prefill-1", "decode-1"} <= served
        # Nothing lost or cut, scaling or not: every request ran to its length, with the
        # tokens of the single-process engine.
        assert len(outputs) == len(prompts) >= NUM_CLIENTS
        assert {(o.finish_reason, o.error) for o in outputs} == {("length", None)}
        reference = LLM().generate(sorted(set(prompts))[:8], PARAMS)
        by_prompt = {cluster.tokenizer.decode(o.prompt_token_ids): o for o in outputs}
        for ref in reference:
            assert by_prompt[ref.prompt].token_ids == ref.token_ids

        # Idle: the planner drains back to one instance per role, and the nodes go.
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            status = cluster.scaling_status()
            if status.running == {"prefill": ["prefill-0"], "decode": ["decode-0"]} and (
                _nodes() == {"prefill": 1, "decode": 1}
            ):
                break
            time.sleep(1.0)
        assert status.running == {"prefill": ["prefill-0"], "decode": ["decode-0"]}, status
        assert status.draining == status.starting == {"prefill": [], "decode": []}
        assert _nodes() == {"prefill": 1, "decode": 1}
    finally:
        cluster.shutdown()
