"""The Conductor's bookkeeping around the policy, without Ray: indexes, queues, reservations."""

from __future__ import annotations

import pytest

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


def test_an_instance_reported_down_gets_no_requests_until_it_answers_again():
    conductor = _conductor(policy="round_robin")
    conductor.instance_down("prefill-0")
    chosen = {
        conductor.schedule(f"r{i}", _hashes(1, i), 16, 4).prefill_instance_id for i in range(4)
    }
    assert chosen == {"prefill-1"}
    # Every prefill instance down: requests still get one, and wait in its queue for the restart.
    conductor.instance_down("prefill-1")
    assert isinstance(conductor.schedule("w", _hashes(1, 9), 16, 4), ScheduleDecision)
    conductor.instance_up("prefill-0")
    conductor.instance_up("prefill-1")
    chosen = {
        conductor.schedule(f"u{i}", _hashes(1, 20 + i), 16, 4).prefill_instance_id for i in range(2)
    }
    assert chosen == {"prefill-0", "prefill-1"}


def test_a_restarted_instance_is_forgotten_in_the_prefix_index():
    conductor = _conductor()
    first = conductor.schedule("a", _hashes(8), 130, 10)
    conductor.prefill_done("a", _hashes(8))
    conductor.request_done("a")
    conductor.instance_down(first.prefill_instance_id)
    conductor.instance_up(first.prefill_instance_id)  # it restarted with an empty cache
    # The prefix now lives only in the store index (where prefill_done also put it).
    assert conductor._prefill_index[first.prefill_instance_id].prefix_length(_hashes(8)) == 0
    assert conductor._store_index.prefix_length(_hashes(8)) == 8


def test_prompts_beyond_the_context_are_rejected_with_the_numbers():
    conductor = Conductor(
        SchedulingConfig(),
        [_load("prefill-0")],
        [_load("decode-0")],
        block_size=16,
        block_bytes=1024,
        store_capacity_blocks=100,
        transfer_bandwidth_bytes_per_s=1e9,
        max_model_len=128,
    )
    out = conductor.schedule("long", _hashes(7), 120, 16)
    assert isinstance(out, Rejection)
    assert out.reason.startswith("max_model_len:") and "120 tokens + max_tokens 16" in out.reason
    assert isinstance(conductor.schedule("fits", _hashes(7), 112, 16), ScheduleDecision)


class _FakeMethod:
    def __init__(self, value):
        self.value = value

    def remote(self, *args):
        async def reply():
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value

        return reply()


class _FakeInstance:
    def __init__(self, hashes=None, load=None):
        self.cached_block_hashes = _FakeMethod(hashes or [])
        self.load = _FakeMethod(load)


class _FakeShard:
    def __init__(self, hashes):
        self.block_hashes = _FakeMethod(hashes)


def test_a_restarted_conductor_rebuilds_its_books_from_the_cluster():
    import asyncio

    cached = _hashes(6, 1)
    stored = _hashes(4, 2)
    # decode-0 runs 3 requests the new conductor never scheduled: 12 of its 20 blocks.
    busy = InstanceLoad("decode-0", 3, 0, 8, 32, dict(COST))
    idle = InstanceLoad("decode-0", 0, 0, 20, 32, dict(COST))
    instances = {
        "prefill-0": _FakeInstance(hashes=cached),
        "prefill-1": _FakeInstance(hashes=RuntimeError("restarting")),
        "decode-0": _FakeInstance(load=busy),
    }
    conductor = Conductor(
        SchedulingConfig(),
        [_load("prefill-0"), _load("prefill-1")],
        [_load("decode-0", blocks=20)],
        block_size=16,
        block_bytes=1024,
        store_capacity_blocks=100,
        transfer_bandwidth_bytes_per_s=1e9,
        instances=instances,
        store_shards=[_FakeShard(stored)],
    )

    async def rebuild_then_drain():
        conductor.ready()  # starts the rebuild in the running loop
        while conductor._decode["decode-0"].orphan_running == 0:
            await asyncio.sleep(0.001)
        during = conductor.schedule("big", _hashes(1, 7), 16 * 9, 16)  # 10 blocks > 8 free
        instances["decode-0"].load = _FakeMethod(idle)  # the orphans finished
        await asyncio.wait_for(conductor._rebuild_task, 10)
        after = conductor.schedule("big2", _hashes(1, 8), 16 * 9, 16)
        return during, after

    during, after = asyncio.run(rebuild_then_drain())
    assert conductor._prefill_index["prefill-0"].prefix_length(cached) == 6
    assert conductor._prefill_index["prefill-1"].prefix_length(cached) == 0
    assert conductor._store_index.prefix_length(stored) == 4
    assert isinstance(during, Rejection)
    assert isinstance(after, ScheduleDecision)
    conductor.request_done("big2")
    decision = conductor.schedule("follow-up", [*cached, *_hashes(1, 3)], 7 * 16, 8)
    assert decision.prefill_instance_id == "prefill-0"


# ---- autoscaling ---------------------------------------------------------------------------


def test_an_added_instance_takes_requests_and_a_draining_one_none():
    conductor = _conductor(policy="round_robin")
    conductor.add_instance(_load("decode-1", blocks=20))
    conductor.drain_instance("prefill-1")
    picks = [conductor.schedule(f"r{i}", _hashes(1, i), 16, 4) for i in range(6)]
    assert {d.prefill_instance_id for d in picks} == {"prefill-0"}
    assert {d.decode_instance_id for d in picks} == {"decode-0", "decode-1"}
    assert conductor.draining_instances() == ["prefill-1"]
    # Adding a known instance again (a re-sync) changes nothing.
    conductor.add_instance(_load("decode-1", blocks=999))
    assert conductor._decode["decode-1"].capacity_blocks == 20


def test_a_drained_instance_is_removed_only_once_nothing_needs_it():
    conductor = _conductor(policy="round_robin")
    first = conductor.schedule("a", _hashes(2), 32, 4)
    busy = first.prefill_instance_id
    conductor.drain_instance(busy)
    assert conductor.num_in_flight(busy) == 1 and conductor.num_in_flight("decode-0") == 1
    # Prefilled, but the decode may still read the KV the prefill instance published.
    conductor.prefill_done("a", _hashes(2))
    assert conductor.num_in_flight(busy) == 1
    with pytest.raises(ValueError, match="still has requests in flight"):
        conductor.remove_instance(busy)
    conductor.request_done("a")
    assert conductor.num_in_flight(busy) == 0
    conductor.remove_instance(busy)
    # A drain that timed out removes the instance anyway and releases what was booked there.
    conductor.add_instance(_load("decode-1", blocks=20))
    stuck = conductor.schedule("b", _hashes(2, 7), 32, 4)
    conductor.drain_instance(stuck.decode_instance_id)
    other = ({"decode-0", "decode-1"} - {stuck.decode_instance_id}).pop()
    conductor.remove_instance(stuck.decode_instance_id, force=True)
    assert conductor.num_in_flight(stuck.prefill_instance_id) == 0
    assert conductor.stats().queued_prefill_seconds[stuck.prefill_instance_id] == 0
    assert conductor._decode[other].reserved_blocks == 0
    conductor.request_done("b")  # the caller's late report changes nothing
    assert set(conductor.stats().queued_prefill_seconds) == {"prefill-0", "prefill-1"} - {busy}
    with pytest.raises(ValueError, match="no instance"):
        conductor.num_in_flight(busy)


def test_the_last_instance_of_a_role_is_never_drained():
    conductor = _conductor()
    with pytest.raises(ValueError, match="last of its role"):
        conductor.drain_instance("decode-0")
    conductor.drain_instance("prefill-0")
    with pytest.raises(ValueError, match="last of its role"):
        conductor.drain_instance("prefill-1")


def test_planner_signals_are_the_books_and_the_window_resets():
    conductor = _conductor(ttft_slo_s=2.0, tbt_slo_s=0.1)
    idle = conductor.planner_signals()
    # Idle: a new request of the typical length (one block until one was scheduled) waits
    # only its own prefill; no decode batch, so no TBT.
    assert [s.predicted_ttft_s for s in idle.prefill] == [pytest.approx(0.005 + 16e-4)] * 2
    assert [(s.tbt_s, s.kv_utilization) for s in idle.decode] == [(None, 0.0)]
    conductor.schedule("a", _hashes(4), 64, 16)  # 5 of decode-0's 20 blocks
    conductor.schedule("big", _hashes(1, 9), 400, 16)  # rejected: 26 blocks > 20
    signals = conductor.planner_signals()
    assert (signals.num_admitted, signals.num_rejected) == (1, 1)
    assert (signals.ttft_slo_s, signals.tbt_slo_s) == (2.0, 0.1)
    typical = round(16 + 0.1 * (64 - 16))  # the prompt-length EWMA after one request
    queued = {s.instance_id: s for s in signals.prefill}
    busy = next(s for s in queued.values() if s.num_queued_requests)
    assert (busy.queued_prefill_tokens, busy.num_queued_requests) == (64, 1)
    assert busy.predicted_ttft_s == pytest.approx(
        (0.005 + 64e-4) + (0.005 + typical * 1e-4)  # the queued prefill + its own
    )
    (decode,) = signals.decode
    assert decode.kv_utilization == pytest.approx(5 / 20)
    assert decode.tbt_s == pytest.approx(0.002 + 1e-4)  # the cost model, batch of one
    assert decode.num_running == 1
    assert decode.slot_utilization == pytest.approx(1 / 32)  # max_num_seqs 32
    again = conductor.planner_signals()
    assert (again.num_admitted, again.num_rejected) == (0, 0)
    # A draining instance is not in the signals.
    conductor.drain_instance(busy.instance_id)
    assert [s.instance_id for s in conductor.planner_signals().prefill] == [
        iid for iid in queued if iid != busy.instance_id
    ]
