"""Expert parallelism on Ray, over a compiled graph and over ordinary calls: the same logits as
in-process experts; a killed shard is restarted and the step in flight re-run."""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch

from raycake.actors.expert_shard import (
    TRANSPORTS,
    TransportStats,
    attach_expert_shards,
    choose_transport,
    create_expert_shards,
    expert_ranges,
)
from raycake.model.loader import load_model
from tests.llama_checkpoints import build_mixtral_checkpoint
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))


def test_expert_ranges_cover_every_expert_once():
    assert [(r.start, r.end) for r in expert_ranges(8, 3)] == [(0, 3), (3, 5), (5, 8)]
    with pytest.raises(ValueError, match="num_expert_shards"):
        expert_ranges(4, 5)


@pytest.fixture(autouse=True)
def short_graph_teardown(monkeypatch):
    """A compiled graph's teardown can hang (see NOTES-ray.md); let it give up in seconds."""
    from ray.dag import DAGContext

    monkeypatch.setattr(DAGContext.get_current(), "teardown_timeout", 5)


def _pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda shard: os.getpid()))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("num_shards", [2, 4])
def test_sharded_experts_match_in_process(ray_session, tmp_path, num_shards, transport):  # noqa: F811
    build_mixtral_checkpoint(tmp_path, 8)
    local = load_model(tmp_path)
    remote = load_model(tmp_path)
    shards = create_expert_shards(tmp_path, 8, num_shards, transport=transport)
    try:
        assert attach_expert_shards(remote, shards) == 2
        for length in (40, 1):  # a prefill, then one token each (a shard may get no rows)
            ids = torch.randint(0, 300, (3, length))
            torch.testing.assert_close(_logits(remote, ids), _logits(local, ids), atol=1e-5, rtol=0)
    finally:
        shards.close()
    # 2 MoE layers x 2 forwards, all on the chosen transport; one graph serves every layer.
    compiled = transport == "compiled"
    assert shards.stats == TransportStats(
        compiled_steps=4 if compiled else 0,
        call_steps=0 if compiled else 4,
        compiles=1 if compiled else 0,
        compile_seconds=shards.stats.compile_seconds,
    )
    assert all(_dies(handle) for handle, _ in shards)  # close() killed the actors


def _dies(handle, within_s: float = 10.0) -> bool:
    """Whether calls to the actor fail within ``within_s`` (ray.kill does not wait)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ready.remote())
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.05)
    return False


def test_killed_shard_is_restarted_and_the_step_retried(ray_session, tmp_path):  # noqa: F811
    build_mixtral_checkpoint(tmp_path, 4)
    local = load_model(tmp_path)
    remote = load_model(tmp_path)
    shards = create_expert_shards(tmp_path, 4, 2, max_restarts=2, transport="compiled")
    try:
        attach_expert_shards(remote, shards)
        ids = torch.randint(0, 300, (2, 24))
        expected = _logits(local, ids)
        torch.testing.assert_close(_logits(remote, ids), expected, atol=1e-5, rtol=0)
        assert (shards.stats.compiled_steps, shards.stats.compiles) == (2, 1)

        handle = shards[0][0]
        pid = _pid(handle)
        ray.kill(handle, no_restart=False)
        deadline = time.monotonic() + 30
        while _pid(handle) == pid:  # wait until Ray has restarted it: the graph is now broken
            assert time.monotonic() < deadline, "the killed shard was not restarted"
            time.sleep(0.05)
        # The first layer's compiled step fails and is re-run by ordinary calls; the second
        # layer compiles a new graph over the restarted shard (which reloaded its experts).
        torch.testing.assert_close(_logits(remote, ids), expected, atol=1e-5, rtol=0)
        assert (shards.stats.recoveries, shards.stats.call_steps) == (1, 1)
        assert (shards.stats.compiled_steps, shards.stats.compiles) == (3, 2)
        torch.testing.assert_close(_logits(remote, ids), expected, atol=1e-5, rtol=0)
        assert (shards.stats.compiled_steps, shards.stats.call_steps) == (5, 1)
    finally:
        shards.close()


def test_killed_shard_is_restarted_and_the_call_retried(ray_session, tmp_path):  # noqa: F811
    build_mixtral_checkpoint(tmp_path, 4)
    local = load_model(tmp_path)
    remote = load_model(tmp_path)
    shards = create_expert_shards(tmp_path, 4, 2, max_restarts=2, transport="calls")
    try:
        attach_expert_shards(remote, shards)
        ids = torch.randint(0, 300, (2, 24))
        ray.kill(shards[0][0], no_restart=False)
        # The next step's call to the dead shard waits for its restart and is retried.
        torch.testing.assert_close(_logits(remote, ids), _logits(local, ids), atol=1e-5, rtol=0)
        assert (shards.stats.call_steps, shards.stats.recoveries) == (2, 0)
    finally:
        shards.close()


def test_engine_serves_through_expert_shards(ray_session, tmp_path):  # noqa: F811
    from raycake import LLM, SamplingParams
    from raycake.engine.config import EngineConfig
    from raycake.model.config import MoEConfig

    build_mixtral_checkpoint(tmp_path, 4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[0, 5, 17, 33], [0, *range(10, 30)]]
    local = LLM(str(tmp_path)).generate(prompts, params)
    llm = LLM(config=EngineConfig(model=str(tmp_path), moe=MoEConfig(num_expert_shards=2)))
    try:
        sharded = llm.generate(prompts, params)
    finally:
        llm.expert_shards.close()
    assert [o.token_ids for o in sharded] == [o.token_ids for o in local]
    # "auto" picked one transport (on a 2-core machine: calls) and every layer-step used it.
    stats = llm.expert_shards.stats
    steps = {"compiled": stats.compiled_steps, "calls": stats.call_steps}
    assert steps.pop(llm.expert_shards.transport) >= 2 * 8  # 2 MoE layers x 8 steps at least
    assert list(steps.values()) == [0]
    assert stats.recoveries == 0


def test_int8_experts_in_shards_match_int8_in_process(ray_session, tmp_path):  # noqa: F811
    """quantization="int8" reaches the shards: they run Int8FusedExperts, same tokens as local."""
    from raycake import LLM, SamplingParams
    from raycake.engine.config import EngineConfig
    from raycake.model.config import MoEConfig

    build_mixtral_checkpoint(tmp_path, 4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[0, 5, 17, 33], [0, *range(10, 30)]]
    local = LLM(str(tmp_path), quantization="int8").generate(prompts, params)
    moe = MoEConfig(num_expert_shards=2, expert_transport="calls")
    with LLM(config=EngineConfig(model=str(tmp_path), moe=moe, quantization="int8")) as llm:
        kinds = ray.get([handle.expert_kinds.remote() for handle, _ in llm.expert_shards])
        sharded = llm.generate(prompts, params)
    assert kinds == [["Int8FusedExperts", "Int8FusedExperts"]] * 2
    assert [o.token_ids for o in sharded] == [o.token_ids for o in local]


def test_auto_transport_compiles_only_with_a_core_per_busy_thread():
    # (node, usable cores) per shard; the driver's torch threads count on its own node.
    assert choose_transport([("a", 2)], "a", driver_threads=1) == "compiled"
    assert choose_transport([("a", 2)], "a", driver_threads=2) == "calls"
    assert choose_transport([("a", 2), ("a", 2)], "a", driver_threads=1) == "calls"
    assert choose_transport([("a", 64)] * 8, "a", driver_threads=56) == "compiled"
    # Shards on other nodes leave the driver's threads out; each node is weighed alone.
    assert choose_transport([("b", 2), ("b", 2), ("c", 2)], "a", driver_threads=32) == "compiled"
    assert choose_transport([("b", 2), ("b", 2), ("b", 2)], "a", driver_threads=1) == "calls"


def test_router_is_chosen_by_name_in_config(tmp_path):
    from raycake.model.config import MoEConfig
    from raycake.policies.routing import HashRouter, SwitchTop1Router

    build_mixtral_checkpoint(tmp_path, 4)
    switch = load_model(tmp_path, moe=MoEConfig(router="switch", capacity_factor=1.25))
    assert isinstance(switch.model.layers[0].mlp.router, SwitchTop1Router)
    hashed = load_model(tmp_path, moe=MoEConfig(router="hash"))
    assert isinstance(hashed.model.layers[1].mlp.router, HashRouter)
    ids = torch.tensor([[0, 5, 17, 33]])
    with torch.no_grad():
        hashed(ids, torch.arange(4)[None])
    # Hash routing sends a token to the same expert wherever it appears.
    first = hashed.model.layers[0].last_routing.expert_indices[:, 0]
    assert first.tolist() == hashed.model.layers[1].last_routing.expert_indices[:, 0].tolist()
    with pytest.raises(ValueError, match=r"moe\.router"):
        MoEConfig(router="learned-by-vibes")
