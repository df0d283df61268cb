"""The Conductor's bookkeeping around the policy, without Ray: indexes, queues, reservations."""

from __future__ import annotations

from raycake.actors.conductor import Conductor
from raycake.actors.messages import InstanceLoad
from raycake.policies.scheduling import Rejection, ScheduleDecision
from raycake.policies.scheduling_config import SchedulingConfig

COST = {
    "prefill_fixed_s": 0.005,
    "prefill_per_token_s": 1e-4,
    "prefill_per_token_pair_s": 0.0,
    "decode_fixed_s": 0.002,
    "decode_per_seq_s": 1e-4,
    "decode_per_context_token_s": 0.0,
}


def _load(iid: str, blocks: int = 1000) -> InstanceLoad:
    return InstanceLoad(iid, 0, 0, blocks, 32, dict(COST))


def _conductor(**scheduling) -> Conductor:
    return Conductor(
        SchedulingConfig(**scheduling),
        [_load("prefill-0"), _load("prefill-1")],
        [_load("decode-0", blocks=20)],
        block_size=16,
        block_bytes=1024,
        store_capacity_blocks=100,
        transfer_bandwidth_bytes_per_s=1e9,
    )


def _hashes(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag]) * 8 + i.to_bytes(8, "little") for i in range(n)]


def test_follow_up_goes_where_the_prefix_is_cached():
    conductor = _conductor()
    first = conductor.schedule("a", _hashes(8), 130, 10)
    assert isinstance(first, ScheduleDecision)
    conductor.prefill_done("a", _hashes(8))
    conductor.request_done("a")
    second = conductor.schedule("b", _hashes(8), 140, 10)
    assert second.prefill_instance_id == first.prefill_instance_id
    assert conductor.stats().queued_prefill_seconds[first.prefill_instance_id] > 0


def test_queue_and_decode_reservations_are_released():
    conductor = _conductor(policy="round_robin")
    decision = conductor.schedule("a", _hashes(4), 64, 16)
    stats = conductor.stats()
    assert stats.queued_prefill_seconds[decision.prefill_instance_id] > 0
    conductor.prefill_done("a", _hashes(4))
    conductor.request_done("a")
    assert all(v == 0 for v in conductor.stats().queued_prefill_seconds.values())
    # 20 free blocks: (64 + 16) tokens need 5; the reservations are back, so 4 more fit.
    for i in range(4):
        assert isinstance(conductor.schedule(f"r{i}", _hashes(4, i + 1), 64, 16), ScheduleDecision)


def test_rejects_when_no_decode_instance_has_room():
    conductor = _conductor()
    out = conductor.schedule("big", _hashes(1), 400, 16)  # 26 blocks > 20 free
    assert isinstance(out, Rejection)
    assert conductor.stats().rejected == 1


def test_measured_store_reads_move_the_bandwidth_estimate():
    conductor = _conductor()
    conductor.prefill_done("unknown", [], store_fetch_bytes=10_000_000, store_fetch_seconds=1.0)
    bandwidth = conductor.stats().transfer_bandwidth_bytes_per_s
    assert bandwidth == 0.7 * 1e9 + 0.3 * 1e7


def test_requests_carry_their_block_hashes_to_the_policy():
    # SGLang's router keeps its own prefix tree from these: a follow-up sharing the first
    # request's 8 blocks matches them all (128 / 140 tokens > 0.3) and follows it.
    conductor = _conductor(policy="sglang_cache_aware")
    hashes = [bytes([i]) * 16 for i in range(8)]
    first = conductor.schedule("a", hashes, 130, 10)
    tree = conductor.policy.tree(first.prefill_instance_id)
    assert tree.match([int.from_bytes(h, "little") for h in hashes]) == 8
    second = conductor.schedule("b", hashes, 140, 10)
    assert second.prefill_instance_id == first.prefill_instance_id
