"""One simulated coupled (vLLM-style) instance: prefill and decode on the same GPUs.

Continuous batching with chunked prefill, as vLLM's v1 scheduler runs it: every step takes one
token of each decoding request, then spends what is left of the token budget
(``max_num_batched_tokens``) on prompt chunks, first of requests already prefilling (in
admission order), then of waiting ones admitted first come, first served while a batch slot
(``max_num_seqs``) and KV blocks for prompt + output are free. A request's KV is reserved on
admission, as the disaggregated decode instances reserve it. Automatic prefix caching: a
request's cached prefix is looked up when it is admitted, and each chunk's full blocks enter the
cache as they are computed; the cache holds the HBM that admitted requests have not reserved,
least recently used blocks evicted first.

A step is one forward pass over its chunks and decode tokens, timed by the timer's
``mixed_step_seconds`` (``RooflineCostModel``: the roofline of the combined batch) or, for a
timer without one (a fitted ``StepCostModel``), as the chunks' prefill times plus the decode
step time (the parts run back to back: an upper bound). A prompt's first token comes at the end
of the step that computes its last chunk; every later token at the end of a step it decodes in.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

# Mooncake's TBT: the mean of the slowest 10% of a request's token intervals (as event_loop.py).
TBT_SLOWEST_SHARE = 0.1


class LruBlocks:
    """Block hashes of one instance's prefix cache, least recently used first."""

    __slots__ = ("_order", "evictions", "hits")

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()
        self.hits = self.evictions = 0

    def __len__(self) -> int:
        return len(self._order)

    def prefix_length(self, hashes: Sequence[int], limit: int) -> int:
        """Leading ``hashes`` held (at most ``limit``), without touching recency."""
        count = 0
        for h in hashes[:limit]:
            if h not in self._order:
                break
            count += 1
        return count

    def use(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._order.move_to_end(h)
        self.hits += len(hashes)

    def insert(self, hashes: Sequence[int], capacity: int) -> None:
        for h in hashes:
            self._order[h] = None
            self._order.move_to_end(h)
        self.trim(capacity)

    def trim(self, capacity: int) -> None:
        while len(self._order) > max(0, capacity):
            self._order.popitem(last=False)
            self.evictions += 1


class CoupledRequest:
    """One trace request's progress through a coupled instance."""

    __slots__ = (
        "admitted_s",
        "arrival_s",
        "cached_tokens",
        "computed",
        "first_token_s",
        "first_token_step",
        "hashes",
        "index",
        "kv_blocks",
        "num_decode_tokens",
        "num_prompt_tokens",
        "predicted_prefill_s",
        "predicted_tbt_s",
        "predicted_ttft_s",
    )

    def __init__(self, index: int, arrival_s: float, num_prompt: int, num_output: int, hashes):
        self.index, self.arrival_s, self.hashes = index, arrival_s, hashes
        self.num_prompt_tokens = num_prompt
        self.num_decode_tokens = num_output - 1  # the last prefill chunk makes the first token
        self.kv_blocks = self.computed = self.cached_tokens = self.first_token_step = 0
        self.admitted_s = self.first_token_s = 0.0
        self.predicted_prefill_s = self.predicted_ttft_s = self.predicted_tbt_s = 0.0


# on_finish(request, end_s, tbt_s, mean_token_interval_s)
FinishCallback = Callable[[CoupledRequest, float, float, float], None]


class CoupledInstance:
    """A coupled instance's scheduler and steps. ``route`` books a request the router sent
    here; ``advance(until_s)`` runs every step that ends by ``until_s``.

    Two scopes of books, as ``DecodeState``: ``assigned_*``, ``reserved_blocks`` and
    ``queued_prefill_s`` count every request routed here (what the router sees); the rest is
    the scheduler's own state.
    """

    def __init__(
        self,
        index: int,
        *,
        timer,
        kv_blocks: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_size: int,
        prefix_caching: bool,
        on_finish: FinishCallback,
    ) -> None:
        self.index, self.instance_id = index, f"coupled-{index}"
        mixed = getattr(timer, "mixed_step_seconds", None)
        self._step_seconds = mixed or (
            lambda chunks, batch, context: (
                sum(timer.prefill_seconds(n, c) for n, c in chunks)
                + timer.decode_step_seconds(batch, context)
            )
        )
        self.kv_capacity = kv_blocks
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.on_finish = on_finish
        self.cache = LruBlocks()
        self.waiting: deque[CoupledRequest] = deque()
        self.prefilling: list[CoupledRequest] = []
        self.num_decoding = self.decoding_context = self.used_blocks = 0
        self.finishing: list[tuple[int, int, CoupledRequest]] = []  # (last step, index, r)
        self.step_durations: list[float] = []
        self.step_end_s: float | None = None  # the step in flight ends then
        self.step_chunks: list[tuple[CoupledRequest, int]] = []
        self.idle_start_s = math.inf  # an idle instance given work starts a step then
        self.assigned = self.assigned_context_tokens = self.assigned_remaining_tokens = 0
        self.reserved_blocks = 0
        self.queued_prefill_s = 0.0
        self.prefill_busy_s = self.decode_busy_s = 0.0
        self.decode_steps = self.decode_step_tokens = 0

    def num_requests(self) -> int:
        return len(self.waiting) + len(self.prefilling) + self.num_decoding

    def route(self, r: CoupledRequest, now_s: float) -> None:
        self.assigned += 1
        self.assigned_context_tokens += r.num_prompt_tokens + 1
        self.assigned_remaining_tokens += r.num_decode_tokens
        self.reserved_blocks += r.kv_blocks
        self.queued_prefill_s += r.predicted_prefill_s
        if self.step_end_s is None and not self.num_requests():
            self.idle_start_s = now_s  # same-time arrivals still join this first step
        self.waiting.append(r)

    def advance(self, until_s: float) -> None:
        while True:
            if self.step_end_s is None:
                if not self.num_requests() or self.idle_start_s >= until_s:
                    return
                self._start_step(self.idle_start_s)
            elif self.step_end_s <= until_s:
                end_s = self.step_end_s
                self._end_step(end_s)
                if self.num_requests():
                    self._start_step(end_s)
                else:
                    self.step_end_s, self.idle_start_s = None, math.inf
            else:
                return

    def _start_step(self, now_s: float) -> None:
        budget = self.budget - self.num_decoding
        chunks = self.step_chunks = []
        for r in self.prefilling:
            if budget <= 0:
                break
            size = min(r.num_prompt_tokens - r.computed, budget)
            chunks.append((r, size))
            budget -= size
        waiting = self.waiting
        while (
            waiting and budget > 0 and self.num_decoding + len(self.prefilling) < self.max_num_seqs
        ):
            r = waiting[0]
            if self.used_blocks + r.kv_blocks > self.kv_capacity:
                break  # first come, first served: later ones wait behind it
            waiting.popleft()
            if self.prefix_caching:
                reusable = (r.num_prompt_tokens - 1) // self.block_size
                hit = self.cache.prefix_length(r.hashes, reusable)
                self.cache.use(r.hashes[:hit])
                r.cached_tokens = r.computed = hit * self.block_size
            r.admitted_s = now_s
            self.used_blocks += r.kv_blocks
            self.cache.trim(self.kv_capacity - self.used_blocks)
            self.prefilling.append(r)
            size = min(r.num_prompt_tokens - r.computed, budget)
            chunks.append((r, size))
            budget -= size
        # NOTE: never empty: with nothing running every waiting request fits (larger ones are
        # rejected on arrival), and the budget covers max_num_seqs decode tokens.
        assert chunks or self.num_decoding, f"{self.instance_id}: an empty step"
        duration = self._step_seconds(
            [(size, r.computed) for r, size in chunks], self.num_decoding, self.decoding_context
        )
        self.step_durations.append(duration)
        self.step_end_s = now_s + duration
        if chunks:
            self.prefill_busy_s += duration
        if self.num_decoding:
            self.decode_busy_s += duration
            self.decode_steps += 1
            self.decode_step_tokens += self.num_decoding

    def _end_step(self, now_s: float) -> None:
        step, batch = len(self.step_durations) - 1, self.num_decoding
        self.decoding_context += batch
        self.assigned_context_tokens += batch
        self.assigned_remaining_tokens -= batch
        finishing = self.finishing
        while finishing and finishing[0][0] == step:
            r = heapq.heappop(finishing)[2]
            num_tokens = r.num_decode_tokens
            # Steps run back to back while it decodes: its intervals are the steps after the
            # one that made its first token.
            first = r.first_token_step + 1
            intervals = self.step_durations[first : first + num_tokens]
            slowest = max(1, math.ceil(TBT_SLOWEST_SHARE * num_tokens))
            tbt = sum(heapq.nlargest(slowest, intervals)) / slowest
            self.num_decoding -= 1
            self.decoding_context -= r.num_prompt_tokens + 1 + num_tokens
            self._release(r, now_s, tbt, (now_s - r.first_token_s) / num_tokens)
        block_size = self.block_size
        for r, size in self.step_chunks:
            before, r.computed = r.computed, r.computed + size
            if self.prefix_caching and r.computed // block_size > before // block_size:
                self.cache.insert(
                    r.hashes[before // block_size : r.computed // block_size],
                    self.kv_capacity - self.used_blocks,
                )
            if r.computed < r.num_prompt_tokens:
                continue
            self.prefilling.remove(r)
            self.queued_prefill_s = max(0.0, self.queued_prefill_s - r.predicted_prefill_s)
            r.first_token_s, r.first_token_step = now_s, step
            if r.num_decode_tokens == 0:
                self._release(r, now_s, math.nan, math.nan)
                continue
            self.num_decoding += 1
            self.decoding_context += r.num_prompt_tokens + 1
            heapq.heappush(finishing, (step + r.num_decode_tokens, r.index, r))
        self.step_chunks = []

    def _release(self, r: CoupledRequest, now_s: float, tbt_s: float, interval_s: float) -> None:
        self.used_blocks -= r.kv_blocks
        self.assigned -= 1
        self.assigned_context_tokens -= r.num_prompt_tokens + 1 + r.num_decode_tokens
        self.reserved_blocks -= r.kv_blocks
        self.on_finish(r, now_s, tbt_s, interval_s)

    def check_invariants(self) -> None:
        """After the run: every request finished and every booked load released."""
        books = (
            self.num_requests(),
            self.used_blocks,
            self.decoding_context,
            self.assigned,
            self.assigned_context_tokens,
            self.assigned_remaining_tokens,
            self.reserved_blocks,
        )
        if any(books) or self.step_end_s is not None:
            raise AssertionError(f"{self.instance_id}: loads left after the run: {books}")
        if len(self.cache) > self.kv_capacity:
            raise AssertionError(f"{self.instance_id}: cache over capacity")
