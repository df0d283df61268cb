"""Which free KV block to reuse next: the prefix cache's eviction policy.

The KV cache manager owns ref counts and the prefix-cache index; a policy only orders the
FREE blocks (ref count 0). A free block may still hold a cached prefix, so the order decides
which cached prefixes survive. Policies are chosen by name (``cache.eviction_policy``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol, runtime_checkable


@runtime_checkable
class EvictionPolicy(Protocol):
    """An ordered set of free block ids.

    Contract: the manager calls ``add`` when a block's ref count drops to 0 (blocks freed
    together are added in the order they should be evicted), ``remove`` when a prefix-cache
    hit takes a free block back into use, and ``pop_victim`` to take a block for new tokens.
    The policy never sees in-use blocks and holds no other state about them. ``add`` of a
    member raises ``ValueError``; ``remove`` of a non-member ``KeyError``; ``pop_victim`` on an
    empty policy ``IndexError``. All operations should be O(1) or O(log n).
    """

    def add(self, block_id: int) -> None: ...

    def remove(self, block_id: int) -> None: ...

    def pop_victim(self) -> int: ...

    def __len__(self) -> int: ...

    def __contains__(self, block_id: object) -> bool: ...


class LRUEvictionPolicy:
    """Least recently freed first: the block freed longest ago is reused first."""

    def __init__(self) -> None:
        # Insertion order is recency: the head is the next victim. Values are unused.
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def add(self, block_id: int) -> None:
        if block_id in self._blocks:
            raise ValueError(f"block {block_id} is already free")
        self._blocks[block_id] = None

    def remove(self, block_id: int) -> None:
        try:
            del self._blocks[block_id]
        except KeyError:
            raise KeyError(f"block {block_id} is not free") from None

    def pop_victim(self) -> int:
        if not self._blocks:
            raise IndexError("no free block to evict")
        block_id, _ = self._blocks.popitem(last=False)
        return block_id

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __repr__(self) -> str:
        return f"LRUEvictionPolicy(free={list(self._blocks)})"


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUEvictionPolicy}


def make_eviction_policy(name: str) -> EvictionPolicy:
    """A fresh, empty policy by its config name."""
    try:
        cls = EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"cache.eviction_policy: expected one of {sorted(EVICTION_POLICIES)}, got {name!r}"
        ) from None
    return cls()
