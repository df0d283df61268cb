"""Block accounting for the paged KV cache, with prefix caching.

The KV tensors live in the runner; this module only decides which block ids a request uses.
A block is in use (ref count > 0, in one or more block tables) or free (ref count 0, held by
the eviction policy). A full block whose KV has been computed is registered under its chained
hash; it stays findable by prefix lookup after it is freed, until the policy hands it out
again for new tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence

from raycake.engine.request import Request
from raycake.policies.eviction import EvictionPolicy, LRUEvictionPolicy


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The prefix-cache key of a block: it covers the parent block's key and this block's tokens.

    blake2b over fixed-width little-endian int32 tokens, so the key is the same in every
    process and on every machine (unlike Python's salted ``hash``).
    """
    digest = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        digest.update(parent_hash)
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return digest.digest()


def block_hashes_for(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def check_block_hashes(
    token_ids: Sequence[int], block_hashes: Sequence[bytes], block_size: int
) -> None:
    """Raise ``ValueError`` naming ``block_hashes`` unless they are exactly the chained hashes
    of ``token_ids``' full blocks: KV registered under wrong hashes would serve later prompts
    another prompt's cache."""
    expected = block_hashes_for(token_ids, block_size)
    got = list(block_hashes)
    if got == expected:
        return
    if len(got) != len(expected):
        raise ValueError(
            f"block_hashes: expected {len(expected)} hashes (the full blocks of {len(token_ids)} "
            f"tokens in blocks of {block_size}), got {len(got)}"
        )
    first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    raise ValueError(
        f"block_hashes: expected the prompt's chained block hashes, got a different hash at "
        f"block {first} ({_show_hash(got[first])} != {expected[first].hex()})"
    )


def _show_hash(value: object) -> str:
    return value.hex() if isinstance(value, (bytes, bytearray)) else repr(value)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Hands out KV block ids to requests and keeps the prefix cache.

    NOTE: the caller (the scheduler) owns request state; every method here reads
    ``request.num_computed_tokens`` and ``request.all_token_ids`` but never changes them.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        eviction_policy: EvictionPolicy | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = LRUEvictionPolicy() if eviction_policy is None else eviction_policy
        if len(self._free) != 0:
            raise ValueError("eviction_policy: expected an empty policy")
        for block_id in range(num_blocks):
            self._free.add(block_id)
        self._ref_counts = [0] * num_blocks
        # The hash a block is registered under, or None. NOTE: a block has a hash iff
        # ``_cached[hash] == block``; a duplicate of a cached block stays unregistered.
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        # How many leading blocks of each request's table are already registered.
        self._num_registered: dict[str, int] = {}
        # How many leading blocks of each request's table it no longer holds (sliding-window
        # attention never reads them again): their ids stay in the table, unreferenced.
        self._num_released: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up in the cache
        self.prefix_cache_hits = 0  # of those, tokens found cached

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref count > 0); cached free blocks count as free."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def cached_block_hashes(self) -> list[bytes]:
        """Every block hash the prefix cache holds (in use or free for reuse)."""
        return list(self._cached)

    @property
    def request_ids(self) -> set[str]:
        """Requests that hold a block table."""
        return set(self._tables)

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none). NOTE: its first
        ``num_released`` entries are released blocks, which may since hold other KV."""
        return list(self._tables.get(request_id, ()))

    def num_released(self, request_id: str) -> int:
        return self._num_released.get(request_id, 0)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds a reference on."""
        return len(self._tables.get(request_id, ())) - self.num_released(request_id)

    # ---- prefix cache ----------------------------------------------------------------------

    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its known tokens."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), len(tokens) // bs):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of the request's leading full blocks found in the prefix cache.

        Returns (block ids, number of cached tokens). Takes no references: pass the blocks to
        ``allocate_slots`` in the same scheduling pass, which counts the lookup in the hit-rate
        counters once the request is actually admitted.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self.update_block_hashes(request)
        # At least one token must be computed to produce the logits of the next one.
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the full blocks within the request's first ``num_computed_tokens`` tokens.

        A block whose hash is already registered (another request computed the same prefix
        concurrently) stays an unregistered duplicate; the existing entry is kept.
        """
        if not self.enable_prefix_caching:
            return
        table = self._tables[request.request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_registered[request.request_id]
        if num_full <= start:
            return
        self.update_block_hashes(request)
        for i in range(start, num_full):
            block_id, block_hash = table[i], request.block_hashes[i]
            if block_hash not in self._cached and self._block_hashes[block_id] is None:
                self._cached[block_hash] = block_id
                self._block_hashes[block_id] = block_hash
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. Blocks in use stay with their requests, unregistered."""
        self._cached.clear()
        self._block_hashes = [None] * self.num_blocks

    # ---- allocation ------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Grow the request's block table to hold ``num_new_tokens`` more tokens.

        ``computed_blocks`` (from ``get_computed_blocks``) is given only when a request is
        admitted without a table; they cover the tokens after ``request.num_computed_tokens``.
        Returns the block ids appended to the table (computed blocks first, then fresh ones),
        or None, with no side effects, when there are not enough free blocks.
        """
        if num_new_tokens < 1:
            raise ValueError(f"request {request.request_id!r}: num_new_tokens {num_new_tokens} < 1")
        rid = request.request_id
        table = self._tables.get(rid, [])
        computed = computed_blocks or []
        if computed and table:
            raise ValueError(f"request {rid!r}: computed_blocks given but it already has blocks")
        num_tokens = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_fresh = max(0, _cdiv(num_tokens, self.block_size) - len(table) - len(computed))
        # Cached blocks that are free come out of the free pool too.
        num_revived = sum(1 for block_id in computed if self._ref_counts[block_id] == 0)
        if num_fresh + num_revived > len(self._free):
            return None

        # Take the computed blocks first so popping victims cannot evict them.
        for block_id in computed:
            if self._ref_counts[block_id] == 0:
                self._free.remove(block_id)
            self._ref_counts[block_id] += 1
        fresh = []
        for _ in range(num_fresh):
            block_id = self._free.pop_victim()
            stale_hash = self._block_hashes[block_id]
            if stale_hash is not None:
                del self._cached[stale_hash]
                self._block_hashes[block_id] = None
            self._ref_counts[block_id] = 1
            fresh.append(block_id)
        if rid not in self._tables:
            # Admission: count the lookup here, so a request that waits is not counted twice.
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed) * self.block_size
            self._tables[rid] = table
            self._num_registered[rid] = len(computed)
            self._num_released[rid] = 0
        new_blocks = computed + fresh
        table.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Drop the request's references and its block table (no-op if it holds none)."""
        table = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        released = self._num_released.pop(request.request_id, 0)
        if table is None:
            return
        # Tail first: the head of a sequence is the prefix most likely to be shared, so it
        # should be the last of this request's blocks to be evicted.
        for block_id in reversed(table[released:]):
            self._unref(block_id)

    def release_leading_blocks(self, request: Request, num_blocks: int) -> None:
        """Drop the request's references on its first ``num_blocks`` blocks (a sliding window
        has moved past them), keeping their prefix-cache registration: they stay findable
        until evicted. Blocks already released are skipped."""
        rid = request.request_id
        table = self._tables[rid]
        start = self._num_released[rid]
        end = min(num_blocks, len(table))
        for block_id in table[start:end]:
            self._unref(block_id)
        self._num_released[rid] = max(start, end)

    def _unref(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free.add(block_id)

    # ---- blocks that arrive from elsewhere (a KV store, another instance) --------------------

    def num_cached_prefix_blocks(self, block_hashes: list[bytes]) -> int:
        """How many leading blocks of a chained-hash sequence this cache holds."""
        count = 0
        for block_hash in block_hashes:
            if block_hash not in self._cached:
                break
            count += 1
        return count

    def import_cached_blocks(self, block_hashes: list[bytes]) -> list[int | None]:
        """Make room for fetched blocks and register them in the prefix cache.

        Returns, per hash, the block id whose contents the caller must now fill (before any
        other allocation), or None where the hash is already cached. Imported blocks are free
        (ref count 0) and most recently used, so they are the last to be evicted. Returns an
        empty list, importing nothing, when the free pool cannot hold them all.
        """
        missing = [h for h in dict.fromkeys(block_hashes) if h not in self._cached]
        if len(missing) > len(self._free):
            return []
        placed: dict[bytes, int] = {}
        for block_hash in missing:
            block_id = self._free.pop_victim()
            stale_hash = self._block_hashes[block_id]
            if stale_hash is not None:
                del self._cached[stale_hash]
            self._block_hashes[block_id] = block_hash
            self._cached[block_hash] = block_id
            self._free.add(block_id)
            placed[block_hash] = block_id
        return [placed.get(h) for h in block_hashes]

    # ---- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call it every step)."""
        holders: Counter[int] = Counter()
        for rid, table in self._tables.items():
            held = table[self._num_released[rid] :]  # released leading blocks are not its own
            if len(set(held)) != len(held):
                dupes = sorted(b for b, n in Counter(held).items() if n > 1)
                raise AssertionError(f"request {rid!r}: blocks {dupes} appear twice in its table")
            if self._num_registered.get(rid, -1) > len(table):
                raise AssertionError(f"request {rid!r}: more registered blocks than blocks")
            holders.update(held)
        for block_id in range(self.num_blocks):
            refs = self._ref_counts[block_id]
            if refs != holders[block_id]:
                raise AssertionError(
                    f"block {block_id}: ref count {refs} but held by {holders[block_id]} table(s)"
                )
            if (refs == 0) != (block_id in self._free):
                state = "free" if block_id in self._free else "not free"
                raise AssertionError(f"block {block_id}: ref count {refs} but {state} in policy")
            block_hash = self._block_hashes[block_id]
            if block_hash is not None and self._cached.get(block_hash) != block_id:
                raise AssertionError(
                    f"block {block_id}: has hash {block_hash.hex()} that maps to "
                    f"{self._cached.get(block_hash)}"
                )
        num_zero = self._ref_counts.count(0)
        if len(self._free) != num_zero:
            raise AssertionError(f"policy holds {len(self._free)} blocks, {num_zero} have ref 0")
        for block_hash, block_id in self._cached.items():
            if self._block_hashes[block_id] != block_hash:
                raise AssertionError(
                    f"prefix cache maps {block_hash.hex()} to block {block_id}, whose hash is "
                    f"{self._block_hashes[block_id]!r}"
                )
