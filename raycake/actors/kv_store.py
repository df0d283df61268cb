"""KVStoreShard: one shard of the distributed KV-cache store, blocks held in Ray's object store.

Each block is stored as a msgpack header (shape, dtype, hash: checked on every read) and an
object ref owned by the shard, so a block outlives the prefill instance that computed it, and
readers on the same node map it zero-copy. Which shard holds a block is ``shard_for_block``.

Titans memory-state snapshots are kept like blocks: the block that ends at a memory-chunk
boundary may carry the state at that boundary in its payload (wire version 3). It lives, is
read, replicated and evicted with its block (a snapshot is useless without its prefix's KV).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray

from raycake.transfer.block_store import BlockStore, StoreStats
from raycake.transfer.wire import KVBlockHeader


def shard_for_block(block_hash: bytes, num_shards: int) -> int:
    """Blocks spread over shards by hash: a long prefix is read from every shard in parallel."""
    return (
        int.from_bytes(hashlib.blake2b(block_hash, digest_size=8).digest(), "little") % num_shards
    )


def replica_shard(primary: int, num_shards: int) -> int:
    """Where a hot block's replica goes (and where readers look when the primary fails)."""
    return (primary + 1) % num_shards


class KVStoreShard:
    """put / get / contains / evict over ``BlockStore``, with LRU eviction by bytes."""

    def __init__(
        self,
        shard_id: int,
        capacity_bytes: int,
        eviction_policy: str = "lru",
        replicate_after_reads: int | None = None,
    ) -> None:
        if replicate_after_reads is not None and replicate_after_reads < 1:
            raise ValueError(
                f"replicate_after_reads: expected None or >= 1, got {replicate_after_reads}"
            )
        self.shard_id = shard_id
        # hash -> (msgpack header, payload ref, whether it carries a memory-state snapshot)
        self._store: BlockStore[tuple[bytes, ray.ObjectRef, bool]] = BlockStore(
            capacity_bytes, eviction_policy
        )
        # Hot-block replication: a block read this many times is copied to the replica shard.
        self.replicate_after_reads = replicate_after_reads
        self._reads: dict[bytes, int] = {}
        self._replicated: set[bytes] = set()
        self._replica: Any | None = None
        self.num_replicated = 0

    def connect_replica(self, replica: Any) -> None:
        """The shard (actor handle) that receives this shard's hot blocks."""
        self._replica = replica

    def put(self, blocks: list[tuple[bytes, bytes, np.ndarray]]) -> int:
        """Store (hash, header, array) blocks not stored yet, and replace a stored block that
        has no memory-state snapshot by the same block with one; returns how many it stored.
        A header that is not a valid wire header raises KVTransferError."""
        stored = 0
        for block_hash, header, array in blocks:
            if not isinstance(block_hash, bytes) or not isinstance(header, bytes):
                raise TypeError("blocks: expected (bytes hash, bytes header, ndarray) tuples")
            with_state = KVBlockHeader.from_msgpack(header).has_memory_state
            upgrade = with_state and self._has_state(block_hash) is False
            if block_hash in self._store and not upgrade:
                self._store.get_prefix([block_hash])  # refresh recency
                continue
            # The argument's object belongs to the caller; ray.put makes a copy this shard owns.
            ref = ray.put(np.ascontiguousarray(array))
            self._store.put(
                block_hash, (header, ref, with_state), int(array.nbytes), replace=upgrade
            )
            stored += 1
        return stored

    def _has_state(self, block_hash: bytes) -> bool | None:
        """Whether the stored block carries a snapshot; None when it is not stored."""
        entry = self._store.peek(block_hash)
        return None if entry is None else entry[2]

    def read_prefix(self, block_hashes: list[bytes]) -> list[tuple[bytes, bytes, np.ndarray]]:
        """The leading blocks of ``block_hashes`` this shard holds, bytes in the reply: one round
        trip for the whole run instead of one fetch per block (blocks are small; the reply is
        not, so it travels through the object store)."""
        found = self._store.get_prefix(block_hashes)
        arrays = ray.get([ref for _, ref, _ in found])
        blocks = [
            (h, header, array)
            for h, (header, _, _), array in zip(block_hashes, found, arrays, strict=False)
        ]
        self._count_reads(blocks)
        return blocks

    def _count_reads(self, blocks: list[tuple[bytes, bytes, np.ndarray]]) -> None:
        if self.replicate_after_reads is None or self._replica is None:
            return
        hot = []
        for block in blocks:
            h = block[0]
            self._reads[h] = self._reads.get(h, 0) + 1
            if self._reads[h] >= self.replicate_after_reads and h not in self._replicated:
                self._replicated.add(h)
                hot.append(block)
        if hot:
            self._replica.put.remote(hot)  # best effort, like Mooncake's replicas
            self.num_replicated += len(hot)

    def contains(self, block_hashes: list[bytes], with_state: bool = False) -> list[bool]:
        """Which blocks are stored; with ``with_state``, which are stored with a snapshot."""
        if with_state:
            return [bool(self._has_state(h)) for h in block_hashes]
        return [h in self._store for h in block_hashes]

    def block_hashes(self) -> list[bytes]:
        """Every block this shard holds: what a restarted conductor rebuilds its index from."""
        return self._store.keys()

    def evict(self, block_hashes: list[bytes]) -> int:
        for h in block_hashes:
            self._reads.pop(h, None)
            self._replicated.discard(h)
        return sum(self._store.evict(h) for h in block_hashes)

    def stats(self) -> StoreStats:
        return self._store.stats()
