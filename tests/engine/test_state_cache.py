"""Memory-state slot accounting (Titans), without a model: slots, snapshots, eviction, pins."""

from __future__ import annotations

import pytest

from raycake.engine.kv_cache import block_hashes_for
from raycake.engine.state_cache import MemoryStateCache

# Blocks of 4 tokens, memory chunks of 8: a snapshot boundary every second block.
HASHES = block_hashes_for(list(range(64)), 4)  # 16 blocks


def _cache(num_slots: int = 3, **kwargs) -> MemoryStateCache:
    return MemoryStateCache(num_slots, block_size=4, chunk_size=8, **kwargs)


def test_a_finished_state_is_found_at_its_boundary_only():
    cache = _cache()
    slot = cache.allocate("a")
    cache.free("a", HASHES[5])  # state at token 24: the end of block 5
    cache.check_invariants()
    assert cache.find_snapshot(HASHES, 16) == (slot, 6)
    # A prefix whose cached KV stops before the boundary cannot use it.
    assert cache.find_snapshot(HASHES, 5) == (None, 0)
    # Only chunk boundaries are looked up: 7 cached blocks round down to 6.
    assert cache.find_snapshot(HASHES, 7) == (slot, 6)


def test_the_longest_snapshot_wins():
    cache = _cache()
    cache.allocate("a")
    short = cache.slot("a")
    cache.free("a", HASHES[1])
    cache.allocate("b")
    long = cache.slot("b")
    cache.free("b", HASHES[7])
    assert cache.find_snapshot(HASHES, 16) == (long, 8)
    assert cache.find_snapshot(HASHES, 6) == (short, 2)


def test_snapshots_are_evicted_least_recently_used_first():
    cache = _cache(num_slots=2)
    cache.allocate("a")
    cache.free("a", HASHES[1])
    cache.allocate("b")
    cache.free("b", HASHES[3])
    cache.allocate("c")  # takes the older snapshot's slot
    assert cache.find_snapshot(HASHES, 16)[1] == 4
    assert cache.find_snapshot(HASHES, 3) == (None, 0)
    cache.check_invariants()


def test_a_pinned_snapshot_survives_allocations_until_released():
    cache = _cache(num_slots=2)
    cache.allocate("a")
    cache.free("a", HASHES[1])
    slot, _ = cache.find_snapshot(HASHES, 16)
    cache.pin(slot)  # the runner copies it at the start of the next step
    assert cache.allocate("b") != slot
    assert cache.allocate("c") is None  # the only other slot is pinned
    cache.check_invariants()
    cache.release_pins()
    assert cache.find_snapshot(HASHES, 16) == (slot, 2)
    assert cache.num_snapshot_hits == 1


def test_two_requests_admitted_in_one_step_share_a_pinned_snapshot():
    cache = _cache(num_slots=3)
    cache.allocate("a")
    cache.free("a", HASHES[1])
    slot, _ = cache.find_snapshot(HASHES, 16)
    for rid in ("b", "c"):  # the same prefix: both start from the snapshot
        assert cache.find_snapshot(HASHES, 16) == (slot, 2)
        cache.pin(slot)
        assert cache.allocate(rid) != slot
    cache.check_invariants()
    cache.release_pins()
    assert cache.num_snapshot_hits == 2
    assert cache.find_snapshot(HASHES, 16) == (slot, 2)
    cache.check_invariants()


def test_no_snapshots_without_prefix_caching_and_a_duplicate_is_not_registered():
    off = _cache(enable_prefix_caching=False)
    off.allocate("a")
    off.free("a", HASHES[1])
    assert off.find_snapshot(HASHES, 16) == (None, 0)
    cache = _cache()
    first = cache.allocate("a")
    cache.allocate("b")
    cache.free("a", HASHES[1])
    cache.free("b", HASHES[1])  # the same boundary: the first snapshot stays the one
    assert cache.find_snapshot(HASHES, 16) == (first, 2)
    cache.check_invariants()


def test_block_size_must_divide_the_chunk():
    with pytest.raises(ValueError, match=r"cache\.block_size: expected a divisor"):
        MemoryStateCache(4, block_size=16, chunk_size=8)
    with pytest.raises(ValueError, match="num_slots"):
        MemoryStateCache(0, block_size=4, chunk_size=8)
