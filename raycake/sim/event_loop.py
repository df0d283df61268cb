"""The discrete-event loop of a simulated disaggregated cluster, driving the real policy objects.

N prefill instances (FIFO queue, one prefill at a time, a local LRU prefix cache each), a global
KV store (prefill instances put every prompt block they computed or fetched; a prefill may fetch
a longer prefix from it), KV transfers prefill -> decode, and M decode instances doing
continuous batching (one token per running request per step, up to ``max_num_seqs`` requests
and ``decode_kv_blocks`` blocks). For each arriving request the simulated conductor builds the
same views as ``raycake.actors.conductor.Conductor`` (store prefix from the store's contents,
each instance's cached prefix, queued prefill seconds, decode loads counting requests assigned
and still in prefill) and calls the policy's ``schedule``; a ``Rejection`` is honoured. Where
the actor only books estimates, the simulator reports what the instances hold: a decode view's
``total_context_tokens`` is the current context (prompt + tokens so far; the actor books prompt
+ max_tokens) and ``mean_remaining_tokens`` the trace's remaining output lengths (the actor
leaves it None). Decode KV is reserved for prompt + output when the request is scheduled.

Timing: a request's TTFT runs from arrival to its KV landing on the decode instance (queue +
store fetch + prefill + transfer); its token intervals are the decode steps it takes part in,
the first one counted from TTFT. Transfers do not contend for links (each runs at the full
bandwidth). Steps are timed by ``step_timer`` (default: the policies' ``cost_model``).

With ``config.planner`` set, an ``autoscaling.Autoscaler`` adds and drains instances at planner
ticks (events in the same heap); without one, no tick is ever queued and the counts stay fixed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import fields

import pyarrow as pa
import pyarrow.compute as pc

from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    Rejection,
    RequestView,
    SchedulingPolicy,
)
from raycake.sim.autoscaling import Autoscaler, instance_seconds
from raycake.sim.config import SimulationConfig, StepTimer
from raycake.sim.instances import DecodeState, PrefillState, PrefixCache, SimRequest
from raycake.sim.results import RequestRows, SimulationResult, summarize

# RequestView gains ``prefix_hashes`` (block hashes for routers with their own prefix trees);
# fill it when this raycake has it.
_VIEW_HAS_PREFIX_HASHES = "prefix_hashes" in {f.name for f in fields(RequestView)}
# Mooncake's TBT: the mean of the slowest 10% of a request's token intervals.
TBT_SLOWEST_SHARE = 0.1
ROLES = ("prefill", "decode")

_PREFILL_DONE, _TRANSFER_DONE, _DECODE_STEP_DONE = 0, 1, 2
_PLANNER_TICK, _INSTANCE_READY = 3, 4  # queued only with a planner


class SimulatedCluster:
    """One run's state and event handlers; ``run`` returns the result."""

    def __init__(self, trace: pa.Table, policy: SchedulingPolicy, config: SimulationConfig) -> None:
        self.policy = policy
        self.config = config
        self.timer: StepTimer = config.step_timer or config.cost_model
        self.block_size = config.block_size
        self.kv_bytes_per_token = config.kv_block_bytes / config.block_size
        self.bandwidth = config.transfer_bandwidth_bytes_per_s
        # The instances taking work (what the policy sees; ``index`` is the position here) and,
        # for the totals and checks, every instance the run ever had.
        self.prefill = [self.new_prefill(i) for i in range(config.num_prefill)]
        self.decode = [self.new_decode(i) for i in range(config.num_decode)]
        self.prefill_by_id = {p.instance_id: p for p in self.prefill}
        self.decode_by_id = {d.instance_id: d for d in self.decode}
        self.every_prefill, self.every_decode = list(self.prefill), list(self.decode)
        self.store = (
            PrefixCache(config.store_capacity_blocks, config.eviction_policy)
            if config.store_capacity_blocks != 0
            else None
        )
        self.events: list[tuple[float, int, int, object]] = []
        self.num_events = 0
        self.decode_step_tokens = 0  # sum of batch sizes over all decode steps
        self.now = 0.0
        self.next_arrival_s = 0.0  # decode steps ending by then may complete without an event
        self.rows = RequestRows()
        self.requests = self._requests(trace)
        self.autoscaler = Autoscaler(self) if config.planner is not None else None

    def new_prefill(self, number: int) -> PrefillState:
        config = self.config
        return PrefillState(
            number, PrefixCache(config.prefill_cache_blocks, config.eviction_policy)
        )

    def new_decode(self, number: int) -> DecodeState:
        return DecodeState(number, self.config.decode_kv_blocks)

    def schedule_ready(self, at_s: float, state: PrefillState | DecodeState) -> None:
        """A started instance takes work from ``at_s`` (the autoscaler's start-up delay)."""
        self._push(at_s, _INSTANCE_READY, state)

    @staticmethod
    def _requests(trace: pa.Table) -> list[SimRequest]:
        missing = {"timestamp_ms", "input_length", "output_length", "hash_ids"} - set(
            trace.column_names
        )
        if missing:
            raise ValueError(f"trace: missing column(s) {sorted(missing)} (use read_trace)")
        timestamps = trace.column("timestamp_ms").to_pylist()
        requests = [
            SimRequest(i, ts / 1000.0, n_in, n_out, hashes)
            for i, (ts, n_in, n_out, hashes) in enumerate(
                zip(
                    timestamps,
                    trace.column("input_length").to_pylist(),
                    trace.column("output_length").to_pylist(),
                    trace.column("hash_ids").to_pylist(),
                    strict=True,
                )
            )
        ]
        # Arrival order; a stable sort keeps file order among equal timestamps.
        if any(b < a for a, b in itertools.pairwise(timestamps)):
            requests.sort(key=lambda r: r.arrival_s)
        return requests

    def _push(self, at_s: float, kind: int, payload: object) -> None:
        self.num_events += 1
        heapq.heappush(self.events, (at_s, self.num_events, kind, payload))

    def _handle_until(self, until_s: float) -> None:
        events = self.events
        while events and events[0][0] <= until_s:
            at_s, _, kind, payload = heapq.heappop(events)
            self.now = at_s
            if kind == _DECODE_STEP_DONE:
                self._decode_step_done(payload)  # type: ignore[arg-type]
            elif kind == _PREFILL_DONE:
                self._prefill_done(payload)  # type: ignore[arg-type]
            elif kind == _TRANSFER_DONE:
                self._transfer_done(payload)  # type: ignore[arg-type]
            elif kind == _PLANNER_TICK:
                self._planner_tick()
            else:
                self.autoscaler.instance_ready(payload)  # type: ignore[union-attr,arg-type]

    def _planner_tick(self) -> None:
        # Ticks stop once every request has finished or been rejected: the run is over.
        if len(self.rows.trace_order) < len(self.requests):
            self.autoscaler.tick(self.now)  # type: ignore[union-attr]
            self._push(self.now + self.config.planner_interval_s, _PLANNER_TICK, None)

    def run(self, progress: bool = False, label: str | None = None) -> SimulationResult:
        from tqdm import tqdm

        started = time.perf_counter()
        bar = tqdm(
            total=len(self.requests),
            disable=not progress,
            unit="req",
            desc=label or self.policy.name,
            mininterval=0.5,
        )
        if self.autoscaler is not None:
            self._push(self.autoscaler.start(self.requests[0].arrival_s), _PLANNER_TICK, None)
        for i, request in enumerate(self.requests):
            self.next_arrival_s = request.arrival_s
            self._handle_until(request.arrival_s)
            self.now = request.arrival_s
            self._arrive(request)
            if i % 512 == 511:
                bar.update(512)
        self.next_arrival_s = math.inf
        self._handle_until(math.inf)
        bar.update(len(self.requests) - bar.n)
        bar.close()
        self.check_invariants()
        table = self.rows.to_table()
        timeline = paid = None
        if self.autoscaler is not None:
            ends = pc.add(table.column("arrival_s"), table.column("e2e_s"))
            timeline = self.autoscaler.finish(pc.max(ends).as_py())
            paid = {f"{role}_instance_s": instance_seconds(timeline, role) for role in ROLES}
        return SimulationResult(
            requests=table,
            summary=summarize(
                table,
                policy=label or self.policy.name,
                num_prefill=self.config.num_prefill,
                num_decode=self.config.num_decode,
                prefill_busy_s=sum(p.busy_s for p in self.every_prefill),
                decode_busy_s=sum(d.busy_s for d in self.every_decode),
                decode_steps=sum(len(d.step_durations) for d in self.every_decode),
                decode_step_tokens=self.decode_step_tokens,
                wall_s=time.perf_counter() - started,
                planner=self.config.planner.name if self.config.planner else None,
                **(paid or {}),
            ),
            timeline=timeline,
        )

    # --- The conductor ------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        config, now, hashes = self.config, self.now, r.hashes
        num_full_blocks = r.num_prompt_tokens // self.block_size
        extra = {"prefix_hashes": tuple(hashes)} if _VIEW_HAS_PREFIX_HASHES else {}
        request = RequestView(
            request_id=f"r{r.index}",
            num_prompt_tokens=r.num_prompt_tokens,
            block_size=self.block_size,
            max_tokens=r.num_decode_tokens + 1,
            store_prefix_blocks=(
                self.store.prefix_length(hashes, num_full_blocks) if self.store else 0
            ),
            store_block_bytes=config.kv_block_bytes,
            ttft_slo_s=config.ttft_slo_s,
            tbt_slo_s=config.tbt_slo_s,
            **extra,
        )
        prefill_views = [
            PrefillInstanceView(
                instance_id=p.instance_id,
                queued_prefill_seconds=p.queued_seconds(now),
                num_queued=p.num_queued(),
                cost_model=config.cost_model,
                cached_prefix_blocks=p.cache.prefix_length(hashes, num_full_blocks),
            )
            for p in self.prefill
        ]
        cluster = ClusterView(
            prefill=prefill_views,
            decode=[
                DecodeInstanceView(
                    instance_id=d.instance_id,
                    num_running=d.assigned,
                    max_num_seqs=config.max_num_seqs,
                    total_context_tokens=d.assigned_context_tokens,
                    free_kv_blocks=d.free_kv_blocks(),
                    cost_model=config.cost_model,
                    mean_remaining_tokens=d.mean_remaining_tokens(),
                )
                for d in self.decode
            ],
            transfer_bandwidth_bytes_per_s=self.bandwidth,
        )
        decision = self.policy.schedule(request, cluster)
        if isinstance(decision, Rejection):
            self._reject(r, decision.reason, decision.predicted_ttft_s, decision.predicted_tbt_s)
            return
        try:
            p = self.prefill_by_id[decision.prefill_instance_id]
            d = self.decode_by_id[decision.decode_instance_id]
        except KeyError as exc:
            raise ValueError(
                f"policy {self.policy.name!r} chose an unknown instance {exc.args[0]!r}"
            ) from None
        r.kv_blocks = request.num_kv_blocks_needed
        if r.kv_blocks > d.capacity_blocks:
            # No policy can make this fit; a real decode instance would fail the request.
            self._reject(
                r,
                f"decode capacity: {r.kv_blocks} KV blocks needed > {d.capacity_blocks} per "
                f"decode instance",
                decision.predicted_ttft_s,
                decision.predicted_tbt_s,
            )
            return
        r.prefill, r.decode = p, d
        r.fetch_blocks = decision.fetch_from_store_blocks
        r.local_blocks_at_schedule = min(
            prefill_views[p.index].cached_prefix_blocks, request.num_reusable_prefix_blocks
        )
        r.predicted_prefill_s = decision.predicted_prefill_s
        r.predicted_ttft_s = decision.predicted_ttft_s
        r.predicted_tbt_s = decision.predicted_tbt_s
        p.queue.append(r)
        p.queued_predicted_s += decision.predicted_prefill_s
        d.assigned += 1
        d.assigned_context_tokens += r.num_prompt_tokens + 1
        d.assigned_remaining_tokens += r.num_decode_tokens
        d.reserved_blocks += r.kv_blocks
        if p.current is None:
            self._start_prefill(p)

    # --- Prefill ------------------------------------------------------------------------

    def _compute_seconds(self, num_new: int, num_cached: int) -> float:
        chunk = self.config.prefill_chunk_tokens
        if chunk is None:
            return self.timer.prefill_seconds(num_new, num_cached)
        seconds = 0.0
        while num_new > 0:
            size = min(chunk, num_new)
            seconds += self.timer.prefill_seconds(size, num_cached)
            num_cached += size
            num_new -= size
        return seconds

    def _start_prefill(self, p: PrefillState) -> None:
        r = p.queue.popleft()
        p.queued_predicted_s = max(0.0, p.queued_predicted_s - r.predicted_prefill_s)
        if not p.queue:
            p.queued_predicted_s = 0.0  # no float drift left over
        hashes, block_size = r.hashes, self.block_size
        reusable = (r.num_prompt_tokens - 1) // block_size
        # What the instance holds now: its cache may have changed since the decision.
        local = p.cache.prefix_length(hashes, reusable)
        fetched = 0
        if r.fetch_blocks and self.store is not None:
            target = min(reusable, r.local_blocks_at_schedule + r.fetch_blocks)
            if target > local:
                fetched = max(0, self.store.prefix_length(hashes, target) - local)
        if local:
            p.cache.use(hashes[:local])
        if fetched:
            self.store.use(hashes[local : local + fetched])  # type: ignore[union-attr]
        r.num_local_blocks, r.num_fetched_blocks = local, fetched
        cached_tokens = (local + fetched) * block_size
        duration = fetched * self.config.kv_block_bytes / self.bandwidth + self._compute_seconds(
            r.num_prompt_tokens - cached_tokens, cached_tokens
        )
        r.prefill_start_s = self.now
        p.current = r
        p.current_predicted_end_s = self.now + r.predicted_prefill_s
        p.busy_s += duration
        self._push(self.now + duration, _PREFILL_DONE, p)

    def _prefill_done(self, p: PrefillState) -> None:
        r = p.current
        assert r is not None
        p.current = None
        # Mooncake: the prefill instance keeps the prompt's blocks and puts them in the store.
        full_blocks = r.hashes[: r.num_prompt_tokens // self.block_size]
        p.cache.insert(full_blocks)
        if self.store is not None:
            self.store.insert(full_blocks)
        transfer_s = r.num_prompt_tokens * self.kv_bytes_per_token / self.bandwidth
        self._push(self.now + transfer_s, _TRANSFER_DONE, r)
        if p.queue:
            self._start_prefill(p)

    # --- Decode -------------------------------------------------------------------------

    def _transfer_done(self, r: SimRequest) -> None:
        r.first_token_s = self.now
        d = r.decode
        assert d is not None
        if r.num_decode_tokens == 0:
            self._release(d, r)
            self._finish(r, math.nan, math.nan)
            return
        d.waiting.append(r)
        if not d.is_stepping:
            self._admit(d)
            self._start_step_event(d)

    def _admit(self, d: DecodeState) -> None:
        """Waiting requests join the batch in arrival order while a slot and blocks are free."""
        max_num_seqs = self.config.max_num_seqs
        waiting = d.waiting
        while waiting and d.num_running < max_num_seqs:
            r = waiting[0]
            if d.used_blocks + r.kv_blocks > d.capacity_blocks:
                break
            waiting.popleft()
            d.num_running += 1
            d.used_blocks += r.kv_blocks
            d.running_context_tokens += r.num_prompt_tokens + 1
            r.decode_join_step = len(d.step_durations)
            heapq.heappush(d.finishing, (r.decode_join_step + r.num_decode_tokens - 1, r.index, r))

    def _start_step(self, d: DecodeState) -> float | None:
        """Begin the next step of ``d``'s batch; its end time, or None when the batch is empty."""
        if d.num_running == 0:
            d.is_stepping = False
            return None
        duration = self.timer.decode_step_seconds(d.num_running, d.running_context_tokens)
        d.step_durations.append(duration)
        d.busy_s += duration
        d.is_stepping = True
        self.decode_step_tokens += d.num_running
        return self.now + duration

    def _start_step_event(self, d: DecodeState) -> None:
        end_s = self._start_step(d)
        if end_s is not None:
            self._push(end_s, _DECODE_STEP_DONE, d)

    def _decode_step_done(self, d: DecodeState) -> None:
        events = self.events
        while True:
            self._end_step(d)
            self._admit(d)
            end_s = self._start_step(d)
            if end_s is None:
                return
            # Fast path: when the step ends before any other event and the next arrival, no
            # one else can act in between, so it completes here without a heap round trip.
            # (A queued event at the same time came first, hence the strict comparison.)
            if end_s <= self.next_arrival_s and (not events or end_s < events[0][0]):
                self.now = end_s
                continue
            self._push(end_s, _DECODE_STEP_DONE, d)
            return

    def _end_step(self, d: DecodeState) -> None:
        """Every running request got a token; those whose last token it was leave."""
        step = len(d.step_durations) - 1
        d.step_ends.append(self.now)
        batch = d.num_running
        d.running_context_tokens += batch
        d.assigned_context_tokens += batch
        d.assigned_remaining_tokens -= batch
        finishing = d.finishing
        while finishing and finishing[0][0] == step:
            _, _, r = heapq.heappop(finishing)
            num_tokens, join = r.num_decode_tokens, r.decode_join_step
            # Token intervals: the first from TTFT to the end of the first step taken part in,
            # then each following step (steps run back to back while the batch is non-empty).
            intervals = d.step_durations[join + 1 : join + num_tokens]
            intervals.append(d.step_ends[join] - r.first_token_s)
            slowest = max(1, math.ceil(TBT_SLOWEST_SHARE * num_tokens))
            tbt = sum(heapq.nlargest(slowest, intervals)) / slowest
            d.num_running -= 1
            d.used_blocks -= r.kv_blocks
            d.running_context_tokens -= r.num_prompt_tokens + 1 + num_tokens
            self._release(d, r)
            self._finish(r, tbt, (self.now - r.first_token_s) / num_tokens)

    @staticmethod
    def _release(d: DecodeState, r: SimRequest) -> None:
        """The conductor's books: the request no longer loads ``d``."""
        d.assigned -= 1
        d.assigned_context_tokens -= r.num_prompt_tokens + 1 + r.num_decode_tokens
        d.reserved_blocks -= r.kv_blocks

    # --- Outputs ------------------------------------------------------------------------

    def _add_row(self, r: SimRequest, **outcome: object) -> None:
        """One per-request row: the request's own columns, then how it ended."""
        self.rows.add(
            r.index,
            request_id=f"r{r.index}",
            arrival_s=r.arrival_s,
            num_prompt_tokens=r.num_prompt_tokens,
            num_output_tokens=r.num_decode_tokens + 1,
            **outcome,
        )

    def _finish(self, r: SimRequest, tbt_s: float, mean_interval_s: float) -> None:
        config = self.config
        ttft = r.first_token_s - r.arrival_s
        self._add_row(
            r,
            rejected=False,
            reject_reason=None,
            prefill_instance=r.prefill.instance_id,  # type: ignore[union-attr]
            decode_instance=r.decode.instance_id,  # type: ignore[union-attr]
            local_cached_tokens=r.num_local_blocks * self.block_size,
            store_fetched_tokens=r.num_fetched_blocks * self.block_size,
            predicted_ttft_s=r.predicted_ttft_s,
            predicted_tbt_s=r.predicted_tbt_s,
            queue_s=r.prefill_start_s - r.arrival_s,
            ttft_s=ttft,
            tbt_s=tbt_s,
            mean_token_interval_s=mean_interval_s,
            e2e_s=self.now - r.arrival_s,
            met_ttft_slo=config.ttft_slo_s is None or ttft <= config.ttft_slo_s,
            met_tbt_slo=config.tbt_slo_s is None or math.isnan(tbt_s) or tbt_s <= config.tbt_slo_s,
        )

    def _reject(
        self, r: SimRequest, reason: str, predicted_ttft_s: float, predicted_tbt_s: float | None
    ) -> None:
        self._add_row(
            r,
            rejected=True,
            reject_reason=reason,
            prefill_instance=None,
            decode_instance=None,
            local_cached_tokens=0,
            store_fetched_tokens=0,
            predicted_ttft_s=predicted_ttft_s,
            predicted_tbt_s=math.nan if predicted_tbt_s is None else predicted_tbt_s,
            queue_s=math.nan,
            ttft_s=math.nan,
            tbt_s=math.nan,
            mean_token_interval_s=math.nan,
            e2e_s=0.0,
            met_ttft_slo=False,
            met_tbt_slo=False,
        )

    def check_invariants(self) -> None:
        """After the run: every queue drained and every booked load released."""
        for p in self.every_prefill:
            if p.queue or p.current is not None:
                raise AssertionError(f"{p.instance_id}: prefills left")
            p.cache.check_invariants()
        for d in self.every_decode:
            books = (
                d.assigned,
                d.assigned_context_tokens,
                d.assigned_remaining_tokens,
                d.reserved_blocks,
                d.num_running,
                d.used_blocks,
                d.running_context_tokens,
                len(d.waiting),
            )
            if any(books):
                raise AssertionError(f"{d.instance_id}: loads left after the run: {books}")
        if self.store is not None:
            self.store.check_invariants()
