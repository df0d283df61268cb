"""The simulator's mutable state: prefix caches (per prefill instance, and the global KV store),
prefill queues and decode batches. Plain classes with slots, no validation on the hot path
(``SimulationConfig`` validates once)."""

from __future__ import annotations

from collections import deque

from raycake.policies.eviction import EvictionPolicy, make_eviction_policy


class PrefixCache:
    """Block hashes held by one cache, evicted by ``eviction_policy`` (LRU: least recently used
    first) once ``capacity_blocks`` are held; ``None``: unlimited.

    NOTE: every held hash is in the eviction policy, ordered by its last insert or use. Blocks in
    use by a running prefill are not pinned: a simulated prefill only reads its prefix at start.
    """

    __slots__ = ("_order", "capacity_blocks", "evictions", "hits", "inserts")

    def __init__(self, capacity_blocks: int | None, eviction_policy: str = "lru") -> None:
        self.capacity_blocks = capacity_blocks
        self._order: EvictionPolicy = make_eviction_policy(eviction_policy)
        self.hits = self.inserts = self.evictions = 0

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._order

    def prefix_length(self, hashes: list[int], limit: int | None = None) -> int:
        """Leading ``hashes`` held (at most ``limit``), without touching recency."""
        order = self._order
        count = 0
        for h in hashes if limit is None else hashes[:limit]:
            if h not in order:
                break
            count += 1
        return count

    def use(self, hashes: list[int]) -> None:
        """A prefill read these (held) blocks: they become most recently used."""
        order = self._order
        for h in hashes:
            order.remove(h)
            order.add(h)
        self.hits += len(hashes)

    def insert(self, hashes: list[int]) -> None:
        """Hold these blocks (most recently used), evicting the policy's victims for room."""
        order = self._order
        capacity = self.capacity_blocks
        if capacity == 0:
            return
        for h in hashes:
            if h in order:
                order.remove(h)
            else:
                if capacity is not None and len(order) >= capacity:
                    order.pop_victim()
                    self.evictions += 1
                self.inserts += 1
            order.add(h)

    def check_invariants(self) -> None:
        if self.capacity_blocks is not None and len(self._order) > self.capacity_blocks:
            raise AssertionError(
                f"{len(self._order)} blocks held > capacity {self.capacity_blocks}"
            )


class SimRequest:
    """One trace request's progress through the simulated cluster."""

    __slots__ = (
        "arrival_s",
        "decode",
        "decode_join_step",
        "fetch_blocks",
        "first_token_s",
        "hashes",
        "index",
        "kv_blocks",
        "local_blocks_at_schedule",
        "num_decode_tokens",
        "num_fetched_blocks",
        "num_local_blocks",
        "num_prompt_tokens",
        "predicted_prefill_s",
        "predicted_tbt_s",
        "predicted_ttft_s",
        "prefill",
        "prefill_start_s",
    )

    def __init__(
        self, index: int, arrival_s: float, num_prompt_tokens: int, output_length: int, hashes: list
    ) -> None:
        self.index = index
        self.arrival_s = arrival_s
        self.num_prompt_tokens = num_prompt_tokens
        # The prefill produces the first output token; decode steps produce the rest.
        self.num_decode_tokens = output_length - 1
        self.hashes = hashes
        self.prefill: PrefillState | None = None
        self.decode: DecodeState | None = None
        self.fetch_blocks = 0
        self.local_blocks_at_schedule = 0
        self.predicted_prefill_s = 0.0
        self.predicted_ttft_s = 0.0
        self.predicted_tbt_s = 0.0
        self.kv_blocks = 0
        self.prefill_start_s = 0.0
        self.num_local_blocks = 0
        self.num_fetched_blocks = 0
        self.first_token_s = 0.0
        self.decode_join_step = 0


class PrefillState:
    """A prefill instance: FIFO queue, one prefill at a time, a local prefix cache."""

    __slots__ = (
        "busy_s",
        "cache",
        "current",
        "current_predicted_end_s",
        "index",
        "instance_id",
        "queue",
        "queued_predicted_s",
    )

    def __init__(self, index: int, cache: PrefixCache) -> None:
        self.index = index
        self.instance_id = f"prefill-{index}"
        self.cache = cache
        self.queue: deque[SimRequest] = deque()
        self.current: SimRequest | None = None
        # Predicted seconds of the queued (not yet started) prefills, as the conductor books them.
        self.queued_predicted_s = 0.0
        self.current_predicted_end_s = 0.0
        self.busy_s = 0.0

    def queued_seconds(self, now_s: float) -> float:
        """Predicted work ahead of a new request: the queue plus the running prefill's remainder."""
        remainder = self.current_predicted_end_s - now_s if self.current is not None else 0.0
        return self.queued_predicted_s + max(0.0, remainder)

    def num_queued(self) -> int:
        return len(self.queue) + (self.current is not None)


class DecodeState:
    """A decode instance: continuous batching, one token per running request per step.

    Bookkeeping in two scopes: ``assigned_*`` counts every request the conductor sent here
    (prefilling, transferring, waiting or running), which is what the policy sees; ``running``
    and ``used_blocks`` are the batch itself.
    """

    __slots__ = (
        "assigned",
        "assigned_context_tokens",
        "assigned_remaining_tokens",
        "busy_s",
        "capacity_blocks",
        "finishing",
        "index",
        "instance_id",
        "is_stepping",
        "num_running",
        "reserved_blocks",
        "running_context_tokens",
        "step_durations",
        "step_ends",
        "used_blocks",
        "waiting",
    )

    def __init__(self, index: int, capacity_blocks: int) -> None:
        self.index = index
        self.instance_id = f"decode-{index}"
        self.capacity_blocks = capacity_blocks
        self.assigned = 0
        self.assigned_context_tokens = 0
        self.assigned_remaining_tokens = 0
        self.reserved_blocks = 0
        self.waiting: deque[SimRequest] = deque()
        self.num_running = 0
        self.running_context_tokens = 0
        self.used_blocks = 0
        # Min-heap of (index of the step that produces the last token, request index, request).
        self.finishing: list[tuple[int, int, SimRequest]] = []
        self.step_durations: list[float] = []
        self.step_ends: list[float] = []
        self.is_stepping = False
        self.busy_s = 0.0

    def free_kv_blocks(self) -> int:
        return max(0, self.capacity_blocks - self.reserved_blocks)

    def mean_remaining_tokens(self) -> float | None:
        if self.assigned == 0 or self.assigned_remaining_tokens <= 0:
            return None
        return self.assigned_remaining_tokens / self.assigned
