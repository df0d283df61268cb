"""Expert parallelism on Ray: the same logits as in-process experts; a killed shard is restarted."""

from __future__ import annotations

import pytest
import ray
import torch

from raycake.actors.expert_shard import (
    attach_expert_shards,
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


@pytest.mark.parametrize("num_shards", [2, 4])
def test_sharded_experts_match_in_process(ray_session, tmp_path, num_shards):  # noqa: F811
    build_mixtral_checkpoint(tmp_path, 8)
    local = load_model(tmp_path)
    remote = load_model(tmp_path)
    shards = create_expert_shards(tmp_path, 8, num_shards)
    try:
        assert attach_expert_shards(remote, shards) == 2
        ids = torch.randint(0, 300, (3, 40))
        torch.testing.assert_close(_logits(remote, ids), _logits(local, ids), atol=1e-5, rtol=0)
    finally:
        for handle, _ in shards:
            ray.kill(handle)


def test_killed_shard_is_restarted_and_the_step_retried(ray_session, tmp_path):  # noqa: F811
    build_mixtral_checkpoint(tmp_path, 4)
    local = load_model(tmp_path)
    remote = load_model(tmp_path)
    shards = create_expert_shards(tmp_path, 4, 2, max_restarts=2)
    try:
        attach_expert_shards(remote, shards)
        ids = torch.randint(0, 300, (2, 24))
        ray.kill(shards[0][0], no_restart=False)
        # The next step's call to the dead shard waits for its restart and is retried.
        torch.testing.assert_close(_logits(remote, ids), _logits(local, ids), atol=1e-5, rtol=0)
    finally:
        for handle, _ in shards:
            ray.kill(handle)


def test_engine_serves_through_expert_shards(ray_session, tmp_path):  # noqa: F811
    from raycake import LLM, SamplingParams
    from raycake.config import EngineConfig, MoEConfig

    build_mixtral_checkpoint(tmp_path, 4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[0, 5, 17, 33], [0, *range(10, 30)]]
    local = LLM(str(tmp_path)).generate(prompts, params)
    llm = LLM(config=EngineConfig(model=str(tmp_path), moe=MoEConfig(num_expert_shards=2)))
    try:
        sharded = llm.generate(prompts, params)
    finally:
        for handle, _ in llm.expert_shards:
            ray.kill(handle)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in local]


def test_router_is_chosen_by_name_in_config(tmp_path):
    from raycake.config import MoEConfig
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
