"""A byte-capacity store of KV blocks keyed by chained block hash: put / get / contains / evict.

Plain Python and generic over the stored value (a KVStoreShard stores Ray object refs), so it
is tested without Ray. Which block goes when the store is full is the eviction policy's call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from raycake.policies.eviction import EvictionPolicy, make_eviction_policy

V = TypeVar("V")


@dataclass(frozen=True)
class StoreStats:
    num_blocks: int
    used_bytes: int
    capacity_bytes: int
    hits: int  # blocks found by get
    misses: int  # blocks asked for and not found
    evictions: int
    puts: int  # blocks newly stored


class BlockStore(Generic[V]):
    """Blocks with sizes, evicted least recently used first once ``capacity_bytes`` is reached.

    NOTE: the eviction policy orders keys by recency of put or get; every stored key is in it.
    """

    def __init__(self, capacity_bytes: int, eviction_policy: str = "lru") -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: expected a positive integer, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._policy: EvictionPolicy = make_eviction_policy(eviction_policy)
        self._values: dict[bytes, tuple[V, int]] = {}
        self.used_bytes = 0
        self._hits = self._misses = self._evictions = self._puts = 0

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: bytes) -> bool:
        return key in self._values

    def keys(self) -> list[bytes]:
        return list(self._values)

    def put(self, key: bytes, value: V, nbytes: int, *, replace: bool = False) -> list[bytes]:
        """Store (or refresh) a block; returns the keys evicted to make room. ``replace``: a
        stored block under ``key`` gives way to this one (e.g. the same KV with a memory-state
        snapshot) instead of only being refreshed."""
        if nbytes <= 0 or nbytes > self.capacity_bytes:
            raise ValueError(
                f"nbytes: expected 1..{self.capacity_bytes} (the store's capacity), got {nbytes}"
            )
        if key in self._values:
            if not replace:
                self._touch(key)
                return []
            # Not an eviction: the block stays, with a new value and size.
            _, size = self._values.pop(key)
            self._policy.remove(key)
            self.used_bytes -= size
        evicted = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim = self._policy.pop_victim()
            _, size = self._values.pop(victim)
            self.used_bytes -= size
            self._evictions += 1
            evicted.append(victim)
        self._values[key] = (value, nbytes)
        self._policy.add(key)
        self.used_bytes += nbytes
        self._puts += 1
        return evicted

    def get_prefix(self, keys: Iterable[bytes]) -> list[V]:
        """Values of the leading keys that are stored (a chained-hash prefix stops at a gap)."""
        found = []
        for key in keys:
            entry = self._values.get(key)
            if entry is None:
                self._misses += 1
                break
            self._touch(key)
            found.append(entry[0])
        self._hits += len(found)
        return found

    def peek(self, key: bytes) -> V | None:
        """The value stored under ``key`` (None if none), without touching recency or stats."""
        entry = self._values.get(key)
        return None if entry is None else entry[0]

    def prefix_length(self, keys: Iterable[bytes]) -> int:
        """How many leading keys are stored, without touching recency."""
        count = 0
        for key in keys:
            if key not in self._values:
                break
            count += 1
        return count

    def evict(self, key: bytes) -> bool:
        entry = self._values.pop(key, None)
        if entry is None:
            return False
        self._policy.remove(key)
        self.used_bytes -= entry[1]
        self._evictions += 1
        return True

    def clear(self) -> int:
        """Evict everything; returns how many blocks went."""
        keys = list(self._values)
        for key in keys:
            self.evict(key)
        return len(keys)

    def stats(self) -> StoreStats:
        return StoreStats(
            num_blocks=len(self._values),
            used_bytes=self.used_bytes,
            capacity_bytes=self.capacity_bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            puts=self._puts,
        )

    def _touch(self, key: bytes) -> None:
        self._policy.remove(key)
        self._policy.add(key)

    def check_invariants(self) -> None:
        total = sum(size for _, size in self._values.values())
        if total != self.used_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} but blocks sum to {total}")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} > capacity {self.capacity_bytes}")
        if len(self._policy) != len(self._values) or any(
            k not in self._policy for k in self._values
        ):
            raise AssertionError("eviction policy and stored keys disagree")
