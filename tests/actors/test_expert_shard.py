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
from tests.model.test_mixtral_parity import _mixtral
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
    _mixtral(tmp_path, 8)
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
    _mixtral(tmp_path, 4)
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
