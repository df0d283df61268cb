"""Continuous batching: which requests compute how many tokens each step.

Prefill, chunked prefill and decode are one idea: each request's ``num_computed_tokens``
catches up with its ``num_tokens``. Each step has a token budget. Running requests go first,
one-token decodes before prefill chunks; then waiting requests are admitted in arrival order.
When KV blocks run out, the most recently added running request is preempted (its blocks
freed, its tokens recomputed when it is admitted again).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable

from raycake.engine.config import CacheConfig, SchedulerConfig
from raycake.engine.kv_cache import KVCacheManager
from raycake.engine.request import Request, RequestStatus
from raycake.engine.state_cache import MemoryStateCache
from raycake.engine.step_contract import (
    CachedRequestData,
    NewRequestData,
    RequestUpdate,
    RunnerOutput,
    SchedulerOutput,
    SchedulerStats,
)
from raycake.policies.eviction import make_eviction_policy

# Speculation: request ids of this step's decodes -> draft tokens (tree nodes) for each; 0 or a
# missing id means plain decoding. A speculation policy's ``budget_for`` fits here.
DraftBudget = Callable[[list[str]], dict[str, int]]


# Finished requests whose blocks are freed even when they asked to hold their KV for export.
_NOT_HELD = (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


class RequestRejected(ValueError):
    """A request that could never run, whatever else is running."""


class Scheduler:
    """FCFS continuous batching over one ``KVCacheManager``. Plain Python: no torch, no Ray."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        draft_budget: DraftBudget | None = None,
        memory_states: MemoryStateCache | None = None,
        sliding_window: int | None = None,
    ) -> None:
        self.config = scheduler_config
        self.draft_budget = draft_budget
        self.block_size = cache_config.block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.kv_cache = KVCacheManager(
            num_blocks,
            cache_config.block_size,
            enable_prefix_caching=cache_config.enable_prefix_caching,
            eviction_policy=make_eviction_policy(cache_config.eviction_policy),
        )
        # Titans models: each running request also holds a memory-state slot, and attends only
        # a window of its KV, so it releases the blocks the window has left.
        self.memory_states = memory_states
        self.sliding_window = sliding_window
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # Priority for preemption: the order of add_request (a larger number is preempted first).
        self._add_order: dict[str, int] = {}
        self._next_order = itertools.count()
        self._finished_ids: set[str] = set()  # finished since the last schedule()
        # Finished requests whose blocks stay allocated until release_held_kv (KV export).
        self.held: dict[str, Request] = {}
        # Requests that arrived with their KV computed elsewhere; sent to the runner next step.
        self._imported: list[Request] = []
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; raise ``RequestRejected`` if it could never fit."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request {rid!r}: a request with this id is already in flight")
        self.check_admissible(rid, request.num_prompt_tokens, request.sampling_params.max_tokens)
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        self._add_order[rid] = next(self._next_order)
        self.waiting.append(request)

    def check_admissible(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``RequestRejected`` for a request that could never run, whatever else runs:
        prompt + ``max_tokens`` beyond ``max_model_len`` or beyond the whole block pool. Pure:
        callers check every request of a batch before queueing any."""
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                f"max_tokens: expected prompt + max_tokens <= max_model_len {self.max_model_len}"
                f"; request {request_id!r}: prompt of {num_prompt_tokens} tokens + max_tokens "
                f"{max_tokens} = {total} tokens"
            )
        # The last sampled token is never fed back, so its KV never needs a slot.
        num_blocks_needed = -(-(total - 1) // self.block_size)
        if num_blocks_needed > self.num_blocks:
            raise RequestRejected(
                f"max_tokens: expected prompt + max_tokens to fit the KV cache; request "
                f"{request_id!r}: prompt of {num_prompt_tokens} tokens + max_tokens {max_tokens} "
                f"needs {num_blocks_needed} KV blocks of {self.block_size} tokens, but the cache "
                f"has only {self.num_blocks}"
            )

    def add_prefilled_request(self, request: Request) -> list[int] | None:
        """Admit a request whose prompt KV was computed elsewhere (disaggregated prefill).

        ``request`` carries its prompt and the first sampled token; its prompt tokens count as
        computed. Returns the block ids the caller must fill with the prompt's KV before the
        next step, or None (nothing changed) when the pool or max_num_seqs has no room yet.
        """
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request {rid!r}: a request with this id is already in flight")
        if request.num_output_tokens != 1:
            raise ValueError(
                f"request {rid!r}: a prefilled request carries exactly its first sampled token, "
                f"got {request.num_output_tokens}"
            )
        # Before any allocation: a request that can never fit must not wait for room forever.
        self.check_admissible(rid, request.num_prompt_tokens, request.sampling_params.max_tokens)
        if len(self.running) >= self.config.max_num_seqs:
            return None
        if self.memory_states is not None and not self.memory_states.num_free_slots:
            return None
        request.num_computed_tokens = 0
        blocks = self.kv_cache.allocate_slots(request, request.num_prompt_tokens)
        if blocks is None:
            return None
        if self.memory_states is not None:
            self.memory_states.allocate(rid)
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        self.requests[rid] = request
        self._add_order[rid] = next(self._next_order)
        self.running.append(request)
        self._imported.append(request)
        self.kv_cache.cache_full_blocks(request, request.num_computed_tokens)
        return blocks

    def release_held_kv(self, request_id: str) -> None:
        """Free the blocks of a finished request that held them for export."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self._free_memory_state(request, snapshot=True)
            self.kv_cache.free(request)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        if self.memory_states is not None:
            self.memory_states.release_pins()  # the last step copied them
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # in scheduling order
        new_blocks: dict[str, list[int]] = {}  # running requests: block ids added this step
        preempted: list[Request] = []
        num_drafts = self._draft_budgets()

        # Running requests, decodes first (a stable sort keeps admission order within each).
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget, self.config.max_prefill_chunk)
            drafts = min(num_drafts.pop(request.request_id, 0), budget - num_new)
            blocks = None
            if drafts > 0:  # a verify step: the last token and the draft tree's nodes
                blocks = self.kv_cache.allocate_slots(request, num_new + drafts)
                if blocks is not None:
                    num_new += drafts
                    num_drafts[request.request_id] = drafts
            if blocks is None:
                blocks = self.kv_cache.allocate_slots(request, num_new)
            while blocks is None:
                victim = max(self.running, key=lambda r: self._add_order[r.request_id])
                self._preempt(victim)
                preempted.append(victim)
                num_drafts.pop(victim.request_id, None)
                if victim.request_id in scheduled:
                    # Already given tokens this step: hand them back.
                    budget += scheduled.pop(victim.request_id)
                    del new_blocks[victim.request_id]
                if victim is request:
                    break
                blocks = self.kv_cache.allocate_slots(request, num_new)
            if blocks is None:
                continue
            scheduled[request.request_id] = num_new
            new_blocks[request.request_id] = blocks
            budget -= num_new

        # Waiting requests in FIFO order. A step that had to preempt has no room for more.
        admitted: list[Request] = []
        memory_sources: dict[str, int] = {}  # request id -> snapshot slot it starts from
        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            source = None
            if self.memory_states is not None:
                if not self.memory_states.num_free_slots:
                    break
                # Cached KV is only a hit up to a boundary whose memory state is cached too.
                source, num_blocks = self.memory_states.find_snapshot(
                    request.block_hashes, len(computed_blocks)
                )
                computed_blocks = computed_blocks[:num_blocks]
                num_cached = num_blocks * self.block_size
            num_new = min(request.num_tokens - num_cached, budget, self.config.max_prefill_chunk)
            if self.kv_cache.allocate_slots(request, num_new, computed_blocks) is None:
                break  # head-of-line: later requests wait too, and nobody is preempted for them
            if self.memory_states is not None:
                if source is not None:
                    self.memory_states.pin(source)
                    memory_sources[request.request_id] = source
                self.memory_states.allocate(request.request_id)
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached  # first admission only
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new

        # NOTE: num_computed_tokens only advances in update_from_output, so it is still the
        # count from before this step. Imported requests reach the runner whole (in
        # new_requests), this step's blocks included.
        imported_ids = {r.request_id for r in self._imported}
        cached_requests = [
            CachedRequestData(rid, blocks, self.requests[rid].num_computed_tokens)
            for rid, blocks in new_blocks.items()
            if rid not in imported_ids
        ]
        new_requests = [
            NewRequestData(
                request_id=r.request_id,
                token_ids=list(r.all_token_ids),
                num_prompt_tokens=r.num_prompt_tokens,
                sampling_params=r.sampling_params,
                block_ids=self.kv_cache.block_ids(r.request_id),
                num_computed_tokens=r.num_computed_tokens,
                memory_slot=self._memory_slot(r.request_id),
                memory_source_slot=memory_sources.get(r.request_id),
            )
            for r in [*self._imported, *admitted]
        ]
        self._imported = []
        finished_ids, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=self._decodes_first(scheduled),
            total_num_scheduled_tokens=sum(scheduled.values()),
            finished_request_ids=finished_ids,
            preempted_request_ids={r.request_id for r in preempted},
            num_draft_tokens={rid: n for rid, n in num_drafts.items() if rid in scheduled},
        )

    def _draft_budgets(self) -> dict[str, int]:
        """Draft tokens per decoding request this step, capped so that the step's tokens fit
        max_tokens and max_model_len (a step emits at most drafts + 1 tokens)."""
        if self.draft_budget is None:
            return {}
        decoding = [
            r
            for r in self.running
            if r.num_computed_tokens + 1 == r.num_tokens and r.num_output_tokens > 0
        ]
        if not decoding:
            return {}
        wanted = self.draft_budget([r.request_id for r in decoding])
        budgets = {}
        for r in decoding:
            cap = min(
                r.sampling_params.max_tokens - r.num_output_tokens - 1,
                self.max_model_len - r.num_tokens - 1,
            )
            n = min(wanted.get(r.request_id, 0), cap)
            if n > 0:
                budgets[r.request_id] = n
        return budgets

    def _decodes_first(self, scheduled: dict[str, int]) -> dict[str, int]:
        """Order the step: one-token decodes (chunks that end at the last known token) first."""

        def is_decode(rid: str) -> bool:
            request = self.requests[rid]
            return scheduled[rid] == 1 and request.num_computed_tokens + 1 == request.num_tokens

        decodes = [rid for rid in scheduled if is_decode(rid)]
        chunks = [rid for rid in scheduled if not is_decode(rid)]
        return {rid: scheduled[rid] for rid in decodes + chunks}

    def _release_out_of_window(self, request: Request) -> None:
        """Release the blocks no later token's window reaches: every position before
        ``num_computed - window + 1``. A request that holds its KV for export keeps it all."""
        if self.sliding_window is None or request.hold_kv_on_finish:
            return
        first_needed = request.num_computed_tokens - self.sliding_window + 1
        if first_needed >= self.block_size:
            self.kv_cache.release_leading_blocks(request, first_needed // self.block_size)

    def _memory_slot(self, request_id: str) -> int | None:
        return None if self.memory_states is None else self.memory_states.slot(request_id)

    def _free_memory_state(self, request: Request, snapshot: bool) -> None:
        """Release a request's memory slot; with ``snapshot``, keep its state at its last
        chunk boundary for requests that share the prefix (its KV blocks are cached)."""
        if self.memory_states is None:
            return
        block_hash = None
        boundary = self.memory_states.boundary(request.num_computed_tokens)
        if snapshot and boundary:
            self.kv_cache.update_block_hashes(request)
            block_hash = request.block_hashes[boundary // self.block_size - 1]
        self.memory_states.free(request.request_id, block_hash)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        if request in self._imported:
            self._imported.remove(request)
        self._free_memory_state(request, snapshot=True)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # The front: it arrived before every request still waiting.
        self.waiting.appendleft(request)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[RequestUpdate]:
        """Advance the scheduled requests by what the runner computed and sampled.

        A request the runner failed (``runner_output.errors``), or whose update raises here,
        finishes with "error" and frees its blocks; the other requests go on.
        """
        updates: list[RequestUpdate] = []
        for rid, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished from outside (abort, stop string) during the step
            error = runner_output.errors.get(rid)
            if error is None:
                try:
                    update = self._update_request(
                        request, num_scheduled, scheduler_output, runner_output
                    )
                except Exception as exc:  # one request's inconsistency must not stop the rest
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    if update is not None:
                        updates.append(update)
                    continue
            self._fail(request, error)
            updates.append(RequestUpdate(rid, [], "error", request.num_cached_tokens, error))
        return updates

    def _update_request(
        self,
        request: Request,
        num_scheduled: int,
        scheduler_output: SchedulerOutput,
        runner_output: RunnerOutput,
    ) -> RequestUpdate | None:
        rid = request.request_id
        sampled = runner_output.sampled_token_ids.get(rid, [])
        if rid in scheduler_output.num_draft_tokens:
            # A verify step computed the last token and the accepted drafts: one fewer
            # than it emits (the bonus token is never computed).
            if not sampled:
                raise RuntimeError(f"request {rid!r}: a verify step sampled no token")
            new_token_ids = self._append_verified(request, sampled)
            return RequestUpdate(
                rid, new_token_ids, request.status.finish_reason, request.num_cached_tokens
            )
        request.num_computed_tokens += num_scheduled
        self.kv_cache.cache_full_blocks(request, request.num_computed_tokens)
        self._release_out_of_window(request)
        reached_end = request.num_computed_tokens == request.num_tokens
        if reached_end != bool(sampled):
            # A silent mismatch would desynchronize the runner's tokens from ours.
            raise RuntimeError(
                f"request {rid!r}: runner sampled {len(sampled)} token(s) for a chunk that "
                f"{'reached' if reached_end else 'did not reach'} its last known token "
                f"({request.num_computed_tokens} of {request.num_tokens} computed)"
            )
        if not sampled:
            return None
        new_token_ids: list[int] = []
        status: RequestStatus | None = None
        for token_id in sampled:
            request.append_output_token(token_id)
            new_token_ids.append(token_id)
            status = self._stop_status(request, token_id)
            if status is not None:
                break
        if status is not None:
            self._finish(request, status)
        return RequestUpdate(
            rid, new_token_ids, request.status.finish_reason, request.num_cached_tokens
        )

    def _append_verified(self, request: Request, sampled: list[int]) -> list[int]:
        """Append a verify step's tokens up to the first stop condition (the rest are dropped);
        register only the blocks of committed tokens with the prefix cache."""
        status: RequestStatus | None = None
        appended: list[int] = []
        for token_id in sampled:
            request.append_output_token(token_id)
            appended.append(token_id)
            status = self._stop_status(request, token_id)
            if status is not None:
                break
        # NOTE: every appended token but the last has its KV at its position now.
        request.num_computed_tokens = request.num_tokens - 1
        self.kv_cache.cache_full_blocks(request, request.num_computed_tokens)
        if status is not None:
            self._finish(request, status)
        return appended

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        # The model chose to stop: "stop" wins over a length limit reached on the same token.
        if (not params.ignore_eos and token_id in request.eos_token_ids) or (
            token_id in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- finishing from outside ------------------------------------------------------------

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish waiting or running requests (abort, stop string); unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status: expected a finished status, got {status.name}")
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self._finish(request, status)

    def fail_requests(self, request_ids: Iterable[str], error: str) -> list[str]:
        """Finish waiting or running requests with "error" (a step that failed as a whole);
        returns the ids that were unfinished. Their blocks are freed, even with hold_kv."""
        failed = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self._fail(request, error)
                failed.append(rid)
        return failed

    def _fail(self, request: Request, error: str) -> None:
        request.error = error
        self._finish(request, RequestStatus.FINISHED_ERROR)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request in self._imported:
            self._imported.remove(request)
        # A failed request's KV may be partly written: it is never held for export.
        if request.hold_kv_on_finish and status not in _NOT_HELD:
            self.held[request.request_id] = request
        else:
            self._free_memory_state(request, snapshot=status not in _NOT_HELD)
            self.kv_cache.free(request)
        request.status = status
        del self.requests[request.request_id]
        del self._add_order[request.request_id]
        self._finished_ids.add(request.request_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: KV blocks and memory-state snapshots."""
        self.kv_cache.reset_prefix_cache()
        if self.memory_states is not None:
            self.memory_states.reset()

    # ---- queries ---------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id (finished requests are forgotten)."""
        return self.requests.get(request_id)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache.usage,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if queues, statuses and block tables disagree."""
        self.kv_cache.check_invariants()
        running = {r.request_id for r in self.running}
        if self.memory_states is not None:
            self.memory_states.check_invariants()
            if self.memory_states.request_ids != running | set(self.held):
                raise AssertionError(
                    f"memory slots for {sorted(self.memory_states.request_ids)}, running "
                    f"{sorted(running)}, held {sorted(self.held)}"
                )
        waiting = {r.request_id for r in self.waiting}
        if len(running) != len(self.running) or len(waiting) != len(self.waiting):
            raise AssertionError("a request appears twice in the running or waiting queue")
        if running & waiting:
            raise AssertionError(f"requests {sorted(running & waiting)} are running and waiting")
        if running | waiting != set(self.requests):
            raise AssertionError(
                f"queued {sorted(running | waiting)} but tracking {sorted(self.requests)}"
            )
        if self.kv_cache.request_ids != running | set(self.held):
            raise AssertionError(
                f"block tables for {sorted(self.kv_cache.request_ids)}, running {sorted(running)}"
                f", held {sorted(self.held)}"
            )
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running > max_num_seqs")
        for r in self.running:
            # Released leading blocks count: they were the sequence's, and its slots index them.
            num_slots = len(self.kv_cache.block_ids(r.request_id)) * self.block_size
            if r.status != RequestStatus.RUNNING or not (
                r.num_computed_tokens < r.num_tokens and r.num_computed_tokens <= num_slots
            ):
                raise AssertionError(f"{r!r}: inconsistent running state ({num_slots} slots)")
        for r in self.waiting:
            if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise AssertionError(f"{r!r}: waiting with status {r.status.name}")
            if r.num_computed_tokens != 0:
                raise AssertionError(f"{r!r}: waiting with computed tokens")
