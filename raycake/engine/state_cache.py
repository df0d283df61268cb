"""Slot accounting for Titans memory states, the cache kind beside paged KV blocks.

A sequence's memory state (the memory MLPs' weights and momentum in every memory layer, plus
the inputs of the chunk being filled) has a fixed size whatever its length, so the pool is a
number of equal slots. A running request holds one slot. When it finishes or is preempted, its
slot goes back to the free pool holding the state at its last memory-chunk boundary, registered
under the chained block hash of that boundary: a *snapshot* that a later request with the same
prefix copies instead of recomputing, until the eviction policy hands the slot out again. The
tensors live in the runner (``memory_state``); this module only decides which slot holds what.

NOTE: a snapshot is only usable with the prefix's KV, so lookups take the KV prefix cache's hit
and cut it back to the longest boundary that has a snapshot. Boundaries are multiples of the
memory chunk, which is a multiple of the KV block size, so every one is a block boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

from raycake.policies.eviction import EvictionPolicy, LRUEvictionPolicy


class MemoryStateCache:
    """Hands out state slots to requests and keeps the snapshots. Plain Python."""

    def __init__(
        self,
        num_slots: int,
        block_size: int,
        chunk_size: int,
        enable_prefix_caching: bool = True,
        eviction_policy: EvictionPolicy | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        if chunk_size % block_size:
            raise ValueError(
                f"cache.block_size: expected a divisor of the Titans memory chunk ({chunk_size} "
                f"tokens) so that memory snapshots sit on block boundaries, got {block_size}"
            )
        self.num_slots = num_slots
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = LRUEvictionPolicy() if eviction_policy is None else eviction_policy
        for slot in range(num_slots):
            self._free.add(slot)
        self._slots: dict[str, int] = {}  # request id -> its slot
        self._slot_hashes: list[bytes | None] = [None] * num_slots
        self._snapshots: dict[bytes, int] = {}  # boundary block hash -> slot
        # Snapshots being copied into a newly admitted request this step: out of the free pool
        # until the runner has copied them (the next ``schedule``).
        self._pinned: list[int] = []
        self.num_snapshot_hits = 0

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of slots held by requests."""
        return len(self._slots) / self.num_slots

    @property
    def request_ids(self) -> set[str]:
        return set(self._slots)

    def slot(self, request_id: str) -> int | None:
        return self._slots.get(request_id)

    def boundary(self, num_tokens: int) -> int:
        """The last memory-chunk boundary at or before ``num_tokens``."""
        return num_tokens // self.chunk_size * self.chunk_size

    def find_snapshot(
        self, block_hashes: Sequence[bytes], num_cached_blocks: int
    ) -> tuple[int | None, int]:
        """The longest snapshot within the first ``num_cached_blocks`` blocks (whose KV is
        cached): (slot, number of blocks it covers), or (None, 0)."""
        if not self.enable_prefix_caching:
            return None, 0
        per_chunk = self.chunk_size // self.block_size
        for num_blocks in range(num_cached_blocks // per_chunk * per_chunk, 0, -per_chunk):
            slot = self._snapshots.get(block_hashes[num_blocks - 1])
            if slot is not None:
                return slot, num_blocks
        return None, 0

    # ---- allocation ------------------------------------------------------------------------

    def pin(self, slot: int) -> None:
        """Keep a free snapshot slot from being handed out until ``release_pins``. Several
        requests admitted in one step may start from the same snapshot: it is pinned once."""
        if slot not in self._pinned:
            self._free.remove(slot)
            self._pinned.append(slot)
        self.num_snapshot_hits += 1

    def release_pins(self) -> None:
        for slot in self._pinned:
            self._free.add(slot)
        self._pinned = []

    def allocate(self, request_id: str) -> int | None:
        """A slot for a request (its previous contents are forgotten), or None if none is free."""
        if request_id in self._slots:
            raise ValueError(f"request {request_id!r}: already holds memory slot")
        slot = self._take_free_slot()
        if slot is not None:
            self._slots[request_id] = slot
        return slot

    def _take_free_slot(self) -> int | None:
        """The eviction policy's victim, its snapshot (if any) forgotten; None if none is free."""
        if not len(self._free):
            return None
        slot = self._free.pop_victim()
        stale = self._slot_hashes[slot]
        if stale is not None:
            del self._snapshots[stale]
            self._slot_hashes[slot] = None
        return slot

    def free(self, request_id: str, snapshot_hash: bytes | None = None) -> None:
        """Release a request's slot; with ``snapshot_hash``, keep its state findable under it
        (a state at that boundary already cached stays the one registered)."""
        slot = self._slots.pop(request_id, None)
        if slot is None:
            return
        if (
            snapshot_hash is not None
            and self.enable_prefix_caching
            and snapshot_hash not in self._snapshots
        ):
            self._snapshots[snapshot_hash] = slot
            self._slot_hashes[slot] = snapshot_hash
        self._free.add(slot)

    def import_snapshot(self, snapshot_hash: bytes) -> int | None:
        """A free slot registered as the snapshot under ``snapshot_hash`` (a state that came
        from elsewhere, e.g. the KV store; the caller writes it into the slot), or None when
        nothing is to be written: prefix caching is off, that snapshot is already here, or no
        slot is free. The slot stays free (most recently used), like a finished request's."""
        if not self.enable_prefix_caching or snapshot_hash in self._snapshots:
            return None
        slot = self._take_free_slot()
        if slot is None:
            return None
        self._snapshots[snapshot_hash] = slot
        self._slot_hashes[slot] = snapshot_hash
        self._free.add(slot)
        return slot

    def reset(self) -> None:
        """Forget every snapshot (slots held by requests stay theirs)."""
        self._snapshots.clear()
        self._slot_hashes = [None] * self.num_slots

    def check_invariants(self) -> None:
        """Raise AssertionError if slots, snapshots and the free pool disagree."""
        held = list(self._slots.values())
        if len(set(held)) != len(held):
            raise AssertionError(f"a memory slot is held by two requests: {self._slots}")
        for slot in range(self.num_slots):
            is_free = slot in self._free
            if is_free == (slot in held or slot in self._pinned):
                raise AssertionError(f"memory slot {slot}: free={is_free} but held/pinned")
            block_hash = self._slot_hashes[slot]
            if block_hash is not None and self._snapshots.get(block_hash) != slot:
                raise AssertionError(f"memory slot {slot}: snapshot hash maps elsewhere")
        for block_hash, slot in self._snapshots.items():
            if self._slot_hashes[slot] != block_hash or slot in held:
                raise AssertionError(f"snapshot {block_hash.hex()} -> slot {slot} is stale")
