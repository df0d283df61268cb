"""The LRU eviction policy over free block ids, and choosing a policy by name."""

from __future__ import annotations

import pytest

from raycake.policies.eviction import (
    EVICTION_POLICIES,
    EvictionPolicy,
    LRUEvictionPolicy,
    make_eviction_policy,
)


def test_victims_come_out_least_recently_freed_first():
    policy = LRUEvictionPolicy()
    for block_id in (5, 2, 9, 7):
        policy.add(block_id)
    assert len(policy) == 4 and 9 in policy and 3 not in policy
    assert policy.pop_victim() == 5
    policy.remove(9)  # a prefix-cache hit takes it back
    policy.add(5)  # freed again: now the most recent
    assert [policy.pop_victim() for _ in range(3)] == [2, 7, 5]
    assert len(policy) == 0


def test_misuse_is_loud():
    policy = LRUEvictionPolicy()
    policy.add(1)
    with pytest.raises(ValueError, match="block 1 is already free"):
        policy.add(1)
    with pytest.raises(KeyError, match="block 2 is not free"):
        policy.remove(2)
    policy.pop_victim()
    with pytest.raises(IndexError):
        policy.pop_victim()


def test_policies_are_chosen_by_config_name():
    assert set(EVICTION_POLICIES) == {"lru"}
    policy = make_eviction_policy("lru")
    assert isinstance(policy, LRUEvictionPolicy) and isinstance(policy, EvictionPolicy)
    assert make_eviction_policy("lru") is not policy  # a fresh one each time
    with pytest.raises(ValueError, match=r"cache.eviction_policy: expected one of \['lru'\]"):
        make_eviction_policy("fifo")
