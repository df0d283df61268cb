"""BlockStore: byte capacity, LRU eviction by recency of put or get, prefix reads."""

from __future__ import annotations

import pytest

from raycake.transfer.block_store import BlockStore


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_evicts_least_recently_used_blocks_by_bytes():
    store: BlockStore[str] = BlockStore(capacity_bytes=300)
    for i in range(3):
        assert store.put(_key(i), f"v{i}", 100) == []
    assert store.get_prefix([_key(0)]) == ["v0"]  # 0 is now the most recent
    assert store.put(_key(3), "v3", 150) == [_key(1), _key(2)]
    assert _key(0) in store and _key(3) in store
    assert store.used_bytes == 250
    store.check_invariants()


def test_prefix_reads_stop_at_the_first_gap():
    store: BlockStore[int] = BlockStore(capacity_bytes=1000)
    for i in (0, 1, 3):
        store.put(_key(i), i, 10)
    keys = [_key(i) for i in range(4)]
    assert store.get_prefix(keys) == [0, 1]
    assert store.prefix_length(keys) == 2
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.num_blocks) == (2, 1, 3)


def test_put_of_a_known_key_refreshes_it_and_stores_nothing():
    store: BlockStore[int] = BlockStore(capacity_bytes=200)
    store.put(_key(0), 0, 100)
    store.put(_key(1), 1, 100)
    assert store.put(_key(0), 0, 100) == []
    assert store.put(_key(2), 2, 100) == [_key(1)]
    assert store.stats().puts == 3


def test_rejects_blocks_larger_than_the_store_and_bad_capacity():
    with pytest.raises(ValueError, match="capacity_bytes"):
        BlockStore(capacity_bytes=0)
    store: BlockStore[int] = BlockStore(capacity_bytes=10)
    with pytest.raises(ValueError, match="nbytes"):
        store.put(_key(0), 0, 11)


def test_clear_and_evict():
    store: BlockStore[int] = BlockStore(capacity_bytes=100)
    store.put(_key(0), 0, 10)
    store.put(_key(1), 1, 10)
    assert store.evict(_key(0)) and not store.evict(_key(0))
    assert store.clear() == 1 and store.used_bytes == 0
    store.check_invariants()


def test_replace_swaps_a_block_for_a_larger_one_and_peek_changes_nothing():
    """A Titans block first stored without its memory snapshot, then with it: the new value
    and size replace the old (making room by evicting others, never the block itself)."""
    store: BlockStore[str] = BlockStore(capacity_bytes=300)
    store.put(_key(0), "kv", 100)
    store.put(_key(1), "other", 100)
    store.put(_key(2), "third", 100)
    assert store.peek(_key(0)) == "kv" and store.peek(_key(9)) is None
    assert store.put(_key(0), "kv+state", 100) == [] and store.peek(_key(0)) == "kv"
    assert store.put(_key(0), "kv+state", 150, replace=True) == [_key(1)]
    assert store.peek(_key(0)) == "kv+state" and store.used_bytes == 250
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (0, 0, 1)  # peek is not a read
    assert store.put(_key(3), "new", 100) == [_key(2)]  # the replaced block counts as recent
    store.check_invariants()
