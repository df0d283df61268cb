"""A KV store shard keeps Titans memory-state snapshots with their blocks: a block that arrives
with a snapshot replaces the same block stored without one, never the other way round."""

from __future__ import annotations

import pytest
import ray
import torch

from raycake.actors.kv_store import KVStoreShard
from raycake.transfer import KVBlockHeader, KVTransferError, pack_kv
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

HASH = bytes(range(16))


def _block(with_state: bool) -> tuple[bytes, bytes, object]:
    kv = torch.ones(2, 2, 1, 4, 2, 8)
    state = {
        "layers.1.weights.0": torch.full((2, 8, 16), 0.5),
        "layers.1.pending": torch.zeros(0, 32),
    }
    header, payload = pack_kv(kv, [HASH], 4, memory_state=state if with_state else None)
    return HASH, header.to_msgpack(), payload


@pytest.fixture
def shard(ray_session):  # noqa: F811
    actor = ray.remote(KVStoreShard).options(num_cpus=0).remote(0, 2**20)
    yield actor
    ray.kill(actor)


def test_a_snapshot_upgrades_a_stored_block_and_stays(shard):
    assert ray.get(shard.put.remote([_block(with_state=False)])) == 1
    assert ray.get(shard.contains.remote([HASH])) == [True]
    assert ray.get(shard.contains.remote([HASH], with_state=True)) == [False]
    assert ray.get(shard.put.remote([_block(with_state=True)])) == 1  # replaced
    assert ray.get(shard.contains.remote([HASH], with_state=True)) == [True]
    assert ray.get(shard.put.remote([_block(with_state=False)])) == 0  # keeps the snapshot
    [(block_hash, header, _)] = ray.get(shard.read_prefix.remote([HASH]))
    assert block_hash == HASH and KVBlockHeader.from_msgpack(header).version == 3
    stats = ray.get(shard.stats.remote())
    assert stats.num_blocks == 1 and stats.evictions == 0
    assert stats.used_bytes == _block(with_state=True)[2].nbytes


def test_a_block_with_a_malformed_header_is_refused(shard):
    with pytest.raises(KVTransferError, match="header: not valid msgpack"):
        ray.get(shard.put.remote([(HASH, b"\xc1", torch.zeros(4).numpy())]))
    assert ray.get(shard.contains.remote([HASH])) == [False]
