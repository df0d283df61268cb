"""Autoscaling in the simulated cluster: the planner policy (``raycake.policies.planner``) on
the simulated instances.

Every ``planner_interval_s`` (a tick) the autoscaler summarises the last window in a
``PlannerView`` and applies the planner's decision. A new instance is paid for from the tick
that adds it and takes work ``instance_startup_s`` later (node + model load). A removed one
drains: the scheduling policy stops seeing it (it leaves the ``ClusterView``), its queued and
running requests finish there, and it goes at the first tick that finds it idle. A starting
instance that is no longer wanted is cancelled at once. Instance ids are never reused.

NOTE: the paid counts change only at ticks, so the timeline (one row per tick, counts after
the tick's changes) integrates exactly to the paid instance-seconds.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import pyarrow as pa

from raycake.policies.planner import (
    DecodeInstanceStats,
    PlannerView,
    PrefillInstanceStats,
    make_planner,
)
from raycake.sim.instances import DecodeState, PrefillState

if TYPE_CHECKING:
    from raycake.sim.event_loop import SimulatedCluster

# Per tick: the paid counts from then on (ready + starting + draining), those taking work, the
# window's arrivals and rejections, and the planner's reason.
TIMELINE_SCHEMA = pa.schema(
    [
        ("time_s", pa.float64()),
        ("num_prefill", pa.int64()),
        ("num_decode", pa.int64()),
        ("num_prefill_ready", pa.int64()),
        ("num_decode_ready", pa.int64()),
        ("arrival_rate_per_s", pa.float64()),  # arrivals in the window before time_s, per s
        ("num_rejected", pa.int64()),  # rejected in that window
        ("reason", pa.string()),
    ]
)
# Mooncake's TBT: the mean of the slowest 10% of intervals (here: of the window's steps).
_SLOWEST_SHARE = 0.1

State = TypeVar("State", PrefillState, DecodeState)


class RolePool(Generic[State]):
    """One role's instances. ``ready`` is the cluster's own list (what the policy sees, in
    order, each ``index`` its position); ``starting`` and ``draining`` are paid but unseen."""

    def __init__(
        self,
        role: str,
        ready: list[State],
        by_id: dict[str, State],
        every: list[State],
        make: Callable[[int], State],
        log: Callable[[str, State], None],
    ) -> None:
        self.role = role
        self.log = log  # (what happened, to which instance)
        self.ready, self.by_id, self.every = ready, by_id, every
        self.make = make  # instance number -> a new instance with id f"{role}-{number}"
        self.starting: list[State] = []
        self.draining: list[State] = []
        self.next_number = len(every)

    @property
    def num_planned(self) -> int:
        """What the planner counts: ready and starting (draining ones are on their way out)."""
        return len(self.ready) + len(self.starting)

    @property
    def num_paid(self) -> int:
        return len(self.ready) + len(self.starting) + len(self.draining)

    def add(self) -> State:
        state = self.make(self.next_number)
        self.next_number += 1
        self.starting.append(state)
        self.every.append(state)
        self.log("start", state)
        return state

    def make_ready(self, state: State) -> None:
        if state not in self.starting:
            return  # cancelled while starting
        self.starting.remove(state)
        state.index = len(self.ready)
        self.ready.append(state)
        self.by_id[state.instance_id] = state
        self.log("ready", state)

    def remove(self, count: int, load: Callable[[State], float]) -> None:
        """Cancel the newest starting instances first, then drain the least loaded ready ones
        (the newest among equals: older prefill instances hold warmer prefix caches)."""
        while count > 0 and self.starting:
            self.log("cancel", self.starting.pop())
            count -= 1
        for _ in range(min(count, len(self.ready))):
            victim = min(reversed(self.ready), key=load)
            self.ready.remove(victim)
            del self.by_id[victim.instance_id]
            self.draining.append(victim)
            self.log("drain", victim)
        for position, state in enumerate(self.ready):
            state.index = position

    def retire_idle(self, is_idle: Callable[[State], bool]) -> None:
        idle = [state for state in self.draining if is_idle(state)]
        for state in idle:
            self.log("retire", state)
            self.draining.remove(state)


def _prefill_idle(p: PrefillState) -> bool:
    return not p.queue and p.current is None


def _decode_idle(d: DecodeState) -> bool:
    return d.assigned == 0  # nothing in prefill, transfer, waiting or running for it


class Autoscaler:
    """The planner's loop inside one ``SimulatedCluster`` run (the cluster calls ``tick`` and
    ``instance_ready`` from its event loop, and ``finish`` at the end)."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        config = cluster.config
        assert config.planner is not None
        self.cluster = cluster
        self.planner = make_planner(config.planner)
        self.interval_s = config.planner_interval_s
        self.startup_s = config.instance_startup_s
        # (time, what happened: start/ready/cancel/drain/retire, instance id), for tests and logs
        self.changes: list[tuple[float, str, str]] = []
        self.prefill = RolePool(
            "prefill", cluster.prefill, cluster.prefill_by_id, cluster.every_prefill,
            cluster.new_prefill, self._log,
        )  # fmt: skip
        self.decode = RolePool(
            "decode", cluster.decode, cluster.decode_by_id, cluster.every_decode,
            cluster.new_decode, self._log,
        )  # fmt: skip
        self.arrivals_s = [r.arrival_s for r in cluster.requests]  # in arrival order
        self.typical_prefill_s = 0.0  # mean predicted prefill of recently admitted requests
        self.decode_step_marks: dict[str, int] = {}  # instance id -> steps seen by the last tick
        self.rows: dict[str, list] = {name: [] for name in TIMELINE_SCHEMA.names}

    def start(self, now_s: float) -> float:
        """Record the initial counts; the first tick's time."""
        self._record(now_s, 0.0, 0, "initial counts")
        return now_s + self.interval_s

    def tick(self, now_s: float) -> None:
        """One planner step at ``now_s`` (the window is the interval before it)."""
        # Requests that arrived in [now - interval, now): a tick runs before arrivals at its time.
        first = bisect.bisect_left(self.arrivals_s, now_s - self.interval_s)
        window = self.cluster.requests[first : bisect.bisect_left(self.arrivals_s, now_s)]
        admitted = [r for r in window if r.prefill is not None]
        if admitted:
            self.typical_prefill_s = sum(r.predicted_prefill_s for r in admitted) / len(admitted)
        num_rejected = len(window) - len(admitted)
        config = self.cluster.config
        view = PlannerView(
            now_s=now_s,
            num_prefill=self.prefill.num_planned,
            num_decode=self.decode.num_planned,
            prefill=tuple(self._prefill_stats(p, now_s) for p in self.prefill.ready),
            decode=tuple(self._decode_stats(d) for d in self.decode.ready),
            num_rejected=num_rejected,
            num_admitted=len(admitted),
            ttft_slo_s=config.ttft_slo_s,
            tbt_slo_s=config.tbt_slo_s,
        )
        decision = self.planner.plan(view)
        for pool, target, load in (
            (self.prefill, decision.num_prefill, lambda p: p.queued_seconds(now_s)),
            (self.decode, decision.num_decode, lambda d: d.assigned),
        ):
            if target > pool.num_planned:
                for _ in range(target - pool.num_planned):
                    self.cluster.schedule_ready(now_s + self.startup_s, pool.add())
            elif target < pool.num_planned:
                pool.remove(pool.num_planned - target, load)  # type: ignore[arg-type]
        self.prefill.retire_idle(_prefill_idle)
        self.decode.retire_idle(_decode_idle)
        self._record(now_s, len(window) / self.interval_s, num_rejected, decision.reason)

    def instance_ready(self, state: PrefillState | DecodeState) -> None:
        if isinstance(state, PrefillState):
            self.prefill.make_ready(state)
        else:
            self.decode.make_ready(state)

    def finish(self, end_s: float) -> pa.Table:
        """The timeline, closed by a row at ``end_s`` (the run's last completion)."""
        last_s = self.rows["time_s"][-1]
        self._record(max(end_s, last_s), math.nan, 0, "end of run")
        return pa.table(self.rows, schema=TIMELINE_SCHEMA)

    def _log(self, what: str, state: PrefillState | DecodeState) -> None:
        self.changes.append((self.cluster.now, what, state.instance_id))

    def _prefill_stats(self, p: PrefillState, now_s: float) -> PrefillInstanceStats:
        block_size = self.cluster.block_size
        waiting = list(p.queue) if p.current is None else [p.current, *p.queue]
        # What each request will compute: its prompt less the prefix cached when it was placed.
        tokens = sum(
            max(0, r.num_prompt_tokens - (r.local_blocks_at_schedule + r.fetch_blocks) * block_size)
            for r in waiting
        )
        return PrefillInstanceStats(
            instance_id=p.instance_id,
            predicted_ttft_s=p.queued_seconds(now_s) + self.typical_prefill_s,
            queued_prefill_tokens=tokens,
            num_queued_requests=p.num_queued(),
            queued_s=p.queued_seconds(now_s),
        )

    def _decode_stats(self, d: DecodeState) -> DecodeInstanceStats:
        mark = self.decode_step_marks.get(d.instance_id, 0)
        steps = d.step_durations[mark:]
        self.decode_step_marks[d.instance_id] = len(d.step_durations)
        tbt_s = None
        if steps:
            slowest = max(1, math.ceil(_SLOWEST_SHARE * len(steps)))
            tbt_s = sum(heapq.nlargest(slowest, steps)) / slowest
        return DecodeInstanceStats(
            instance_id=d.instance_id,
            tbt_s=tbt_s,
            kv_utilization=min(1.0, d.used_blocks / d.capacity_blocks),
            num_running=d.num_running,
            num_waiting=len(d.waiting),
            # As the conductor books slots: from placement on, prefilling requests included.
            slot_utilization=min(1.0, d.assigned / self.cluster.config.max_num_seqs),
        )

    def _record(self, now_s: float, rate: float, num_rejected: int, reason: str) -> None:
        row = (
            now_s,
            self.prefill.num_paid,
            self.decode.num_paid,
            len(self.prefill.ready),
            len(self.decode.ready),
            rate,
            num_rejected,
            reason,
        )
        for column, value in zip(self.rows.values(), row, strict=True):
            column.append(value)


def instance_seconds(timeline: pa.Table, role: str) -> float:
    """Paid seconds of ``role``'s instances: the integral of its count over the timeline."""
    times = timeline.column("time_s").to_pylist()
    counts = timeline.column(f"num_{role}").to_pylist()
    return sum(c * (b - a) for c, a, b in zip(counts, times, times[1:], strict=False))
