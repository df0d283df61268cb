"""KVStoreShard: one shard of the distributed KV-cache store, blocks held in Ray's object store.

Each block is stored as a msgpack header (shape, dtype, hash: checked on every read) and an
object ref owned by the shard, so a block outlives the prefill instance that computed it, and
readers on the same node map it zero-copy. Which shard holds a block is ``shard_for_block``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import ray

from raycake.transfer.block_store import BlockStore, StoreStats


def shard_for_block(block_hash: bytes, num_shards: int) -> int:
    """Blocks spread over shards by hash: a long prefix is read from every shard in parallel."""
    return (
        int.from_bytes(hashlib.blake2b(block_hash, digest_size=8).digest(), "little") % num_shards
    )


@dataclass(frozen=True)
class StoredBlock:
    """What a read returns: the header bytes and the block's object ref (wrapped, so Ray hands
    the caller the ref rather than resolving it in transit)."""

    block_hash: bytes
    header: bytes
    ref: list  # [ray.ObjectRef] of a numpy array


class KVStoreShard:
    """put / get / contains / evict over ``BlockStore``, with LRU eviction by bytes."""

    def __init__(self, shard_id: int, capacity_bytes: int, eviction_policy: str = "lru") -> None:
        self.shard_id = shard_id
        self._store: BlockStore[tuple[bytes, ray.ObjectRef]] = BlockStore(
            capacity_bytes, eviction_policy
        )

    def put(self, blocks: list[tuple[bytes, bytes, np.ndarray]]) -> int:
        """Store (hash, header, array) blocks not stored yet; returns how many were new."""
        stored = 0
        for block_hash, header, array in blocks:
            if not isinstance(block_hash, bytes) or not isinstance(header, bytes):
                raise TypeError("blocks: expected (bytes hash, bytes header, ndarray) tuples")
            if block_hash in self._store:
                self._store.get_prefix([block_hash])  # refresh recency
                continue
            # The argument's object belongs to the caller; ray.put makes a copy this shard owns.
            ref = ray.put(np.ascontiguousarray(array))
            self._store.put(block_hash, (header, ref), int(array.nbytes))
            stored += 1
        return stored

    def get_prefix(self, block_hashes: list[bytes]) -> list[StoredBlock]:
        """The leading blocks of ``block_hashes`` this shard holds."""
        found = self._store.get_prefix(block_hashes)
        return [
            StoredBlock(h, header, [ref])
            for h, (header, ref) in zip(block_hashes, found, strict=False)
        ]

    def read_prefix(self, block_hashes: list[bytes]) -> list[tuple[bytes, bytes, np.ndarray]]:
        """Like ``get_prefix`` but with the blocks' bytes in the reply: one round trip for the
        whole run instead of one fetch per block (blocks are small; the reply is not)."""
        found = self._store.get_prefix(block_hashes)
        arrays = ray.get([ref for _, ref in found])
        return [
            (h, header, array)
            for h, (header, _), array in zip(block_hashes, found, arrays, strict=False)
        ]

    def contains(self, block_hashes: list[bytes]) -> list[bool]:
        return [h in self._store for h in block_hashes]

    def evict(self, block_hashes: list[bytes]) -> int:
        return sum(self._store.evict(h) for h in block_hashes)

    def stats(self) -> StoreStats:
        return self._store.stats()
