"""How many prefill and decode instances to run: the autoscaling planner policy.

Every window (a few seconds) the caller summarises the cluster in a ``PlannerView`` and asks
``Planner.plan`` for a ``PlannerDecision``: the instance count per role, within
``PlannerConfig``'s bounds, and why. The caller adds or drains instances to match; Ray's
autoscaler (KubeRay) then adds or removes the nodes that offer each role's resource.

Planners, chosen by name (``PlannerConfig.name``):
- ``slo`` (raycake's): prefill on predicted TTFT against the TTFT SLO and on rejections, decode
  on TBT against the TBT SLO and on KV use; hysteresis (separate up/down thresholds), a
  cool-down per role, scale-down only after the load has stayed low for ``down_stable_s``, one
  instance at a time; scale-up in proportion to the excess, at most ``max_step`` at once.
- ``dynamo``: NVIDIA Dynamo's load-based planner (thresholds on the prefill queue and on the
  decode KV utilisation, at most one worker per role per adjustment interval).
- ``llmd``: llm-d's workload variant autoscaler, saturation analyzer (KV usage 0.8, queue 5).
- ``fixed``: never changes the counts.

NOTE: planners keep their own clocks (last change, low load since) and assume their decisions
are applied; each view reports the counts actually running. Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from raycake.validation import (
    check_choice,
    check_count,
    check_int,
    check_number,
    is_int,
    require,
)

PLANNER_NAMES = ("dynamo", "fixed", "llmd", "slo")

# --- Configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerConfig:
    """The planner by name, its bounds per role and its thresholds (each planner reads its own:
    unprefixed ones are the ``slo`` planner's, ``dynamo_*`` and ``llmd_*`` the baselines')."""

    name: str = "fixed"  # fixed by default: a deployment scales only when asked to
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    # slo: fractions of the SLO; above scale_up_at scale up, below scale_down_at scale down.
    scale_up_at: float = 0.8
    scale_down_at: float = 0.3
    # slo: scale prefill up when over this fraction of the window's requests were rejected.
    reject_up_fraction: float = 0.02
    # slo: mean KV use of the decode instances that scales decode up / down.
    kv_scale_up_at: float = 0.85
    kv_scale_down_at: float = 0.4
    # No change in a role for this long after its last change: a new instance needs time to
    # load and warm up before its effect shows. Also the baselines' evaluation interval.
    cooldown_s: float = 30.0
    # slo: scale down only once the load has stayed low this long (bursts come back).
    down_stable_s: float = 60.0
    max_step: int = 4  # slo: most instances added at once
    # dynamo: queued prefill tokens per prefill instance that scale prefill up / down.
    dynamo_queue_up_tokens: float = 4096.0
    dynamo_queue_down_tokens: float = 512.0
    # dynamo: mean decode KV utilisation that scales decode up / down (Dynamo's defaults).
    dynamo_kv_up_at: float = 0.9
    dynamo_kv_down_at: float = 0.5
    # llmd: an instance is saturated at this KV usage or this many queued requests; scale up
    # when the mean spare capacity of the others falls below the triggers (llm-d's defaults).
    llmd_kv_cache_threshold: float = 0.8
    llmd_queue_length_threshold: int = 5
    llmd_kv_spare_trigger: float = 0.1
    llmd_queue_spare_trigger: float = 3.0

    def __post_init__(self) -> None:
        check_choice("planner.name", self.name, PLANNER_NAMES)
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
            check_int(f"planner.min_{role}", low, low=1)
            require(
                is_int(high) and high >= low,
                f"planner.max_{role}",
                f"an integer >= planner.min_{role} ({low})",
                high,
            )
        self._check_below("scale_down_at", "scale_up_at", low=0.0, high=None)
        check_number("planner.reject_up_fraction", self.reject_up_fraction, low=0, high=1)
        self._check_below("kv_scale_down_at", "kv_scale_up_at", low=0.0, high=1.0)
        check_number("planner.cooldown_s", self.cooldown_s, low=0)
        check_number("planner.down_stable_s", self.down_stable_s, low=0)
        check_int("planner.max_step", self.max_step, low=1)
        self._check_below("dynamo_queue_down_tokens", "dynamo_queue_up_tokens", low=0.0, high=None)
        self._check_below("dynamo_kv_down_at", "dynamo_kv_up_at", low=0.0, high=1.0)
        check_number(
            "planner.llmd_kv_cache_threshold",
            self.llmd_kv_cache_threshold,
            low=0,
            high=1,
            low_exclusive=True,
        )
        check_int("planner.llmd_queue_length_threshold", self.llmd_queue_length_threshold, low=1)
        check_number(
            "planner.llmd_kv_spare_trigger",
            self.llmd_kv_spare_trigger,
            low=0,
            high=self.llmd_kv_cache_threshold,
        )
        check_number(
            "planner.llmd_queue_spare_trigger",
            self.llmd_queue_spare_trigger,
            low=0,
            high=self.llmd_queue_length_threshold,
        )

    def _check_below(self, lower: str, upper: str, low: float, high: float | None) -> None:
        """Two thresholds of a hysteresis band: each a number in range, the lower one below."""
        check_number(f"planner.{upper}", getattr(self, upper), low=low, high=high)
        check_number(f"planner.{lower}", getattr(self, lower), low=low, high=high)
        require(
            getattr(self, lower) < getattr(self, upper),
            f"planner.{lower}",
            f"a number below planner.{upper} ({getattr(self, upper)!r})",
            getattr(self, lower),
        )

    def bounds(self, role: str) -> tuple[int, int]:
        """(min, max) instances of ``role`` ("prefill" or "decode")."""
        return getattr(self, f"min_{role}"), getattr(self, f"max_{role}")


# --- What a planner sees and returns ------------------------------------------------------------


@dataclass(frozen=True)
class PrefillInstanceStats:
    """One prefill instance over the last window."""

    instance_id: str
    # Seconds a new request of typical length would wait for its first token here: queued
    # prefill time plus its own prefill.
    predicted_ttft_s: float
    queued_prefill_tokens: int
    num_queued_requests: int = 0
    # Of predicted_ttft_s, the wait behind the prefills queued there (the rest is the new
    # request's own prefill, which no number of instances shortens); None: not known, all of
    # predicted_ttft_s counts as wait.
    queued_s: float | None = None

    def __post_init__(self) -> None:
        where = f"prefill instance {self.instance_id!r}"
        check_number(f"{where}.predicted_ttft_s", self.predicted_ttft_s, low=0)
        check_count(f"{where}.queued_prefill_tokens", self.queued_prefill_tokens)
        check_count(f"{where}.num_queued_requests", self.num_queued_requests)
        if self.queued_s is not None:
            check_number(f"{where}.queued_s", self.queued_s, low=0, high=self.predicted_ttft_s)


@dataclass(frozen=True)
class DecodeInstanceStats:
    """One decode instance over the last window."""

    instance_id: str
    # Recent seconds per output token; None: it produced no token in the window (idle).
    tbt_s: float | None
    kv_utilization: float  # KV blocks in use / all blocks, 0..1
    num_running: int
    num_waiting: int = 0  # assigned but not yet running (no KV room or batch slot)
    # Batch slots taken / max_num_seqs, 0..1, counting requests placed here that are still in
    # prefill (the conductor books a slot from the moment it places a request): a full batch
    # rejects requests as surely as a full KV cache does.
    slot_utilization: float = 0.0

    def __post_init__(self) -> None:
        where = f"decode instance {self.instance_id!r}"
        if self.tbt_s is not None:
            check_number(f"{where}.tbt_s", self.tbt_s, low=0)
        check_number(f"{where}.kv_utilization", self.kv_utilization, low=0, high=1)
        check_number(f"{where}.slot_utilization", self.slot_utilization, low=0, high=1)
        check_count(f"{where}.num_running", self.num_running)
        check_count(f"{where}.num_waiting", self.num_waiting)


@dataclass(frozen=True)
class PlannerView:
    """The cluster over the last window. Instances still starting are counted in ``num_*`` but
    have no stats yet, so ``len(prefill) <= num_prefill``."""

    now_s: float  # monotonic seconds
    num_prefill: int
    num_decode: int
    prefill: tuple[PrefillInstanceStats, ...] = ()
    decode: tuple[DecodeInstanceStats, ...] = ()
    num_rejected: int = 0  # requests the conductor rejected in the window
    num_admitted: int = 0
    ttft_slo_s: float | None = None  # None: no SLO of that kind
    tbt_slo_s: float | None = None

    def __post_init__(self) -> None:
        check_number("planner view.now_s", self.now_s)
        for role, stats, kind in (
            ("prefill", self.prefill, PrefillInstanceStats),
            ("decode", self.decode, DecodeInstanceStats),
        ):
            count = getattr(self, f"num_{role}")
            check_count(f"planner view.num_{role}", count)
            require(
                isinstance(stats, tuple) and all(isinstance(s, kind) for s in stats),
                f"planner view.{role}",
                f"a tuple of {kind.__name__}",
                stats,
            )
            require(
                len(stats) <= count,
                f"planner view.{role}",
                f"at most num_{role} ({count}) instances' stats",
                len(stats),
            )
        check_count("planner view.num_rejected", self.num_rejected)
        check_count("planner view.num_admitted", self.num_admitted)
        for name in ("ttft_slo_s", "tbt_slo_s"):
            if getattr(self, name) is not None:
                check_number(f"planner view.{name}", getattr(self, name), low=0, low_exclusive=True)

    @property
    def rejected_fraction(self) -> float:
        total = self.num_rejected + self.num_admitted
        return self.num_rejected / total if total else 0.0


@dataclass(frozen=True)
class PlannerDecision:
    """Instance counts to run from now on, and why (for logs and the dashboard)."""

    num_prefill: int
    num_decode: int
    reason: str


class Planner(Protocol):
    """Decides instance counts from successive views (``now_s`` never goes back)."""

    name: str

    def plan(self, view: PlannerView) -> PlannerDecision: ...


# --- Helpers ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``fraction`` of the values at or
    below it (with fewer than 10 values, p90 is the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def proportional_step(current: int, overload: float, max_step: int) -> int:
    """Instances to add so that ``overload`` (signal / up threshold, > 1) spread over the new
    count is back at the threshold: ``ceil(current * overload) - current``, in [1, max_step].
    NOTE: load spreads as 1/n; the fixed part of a latency does not, so this errs high, which
    ``max_step`` caps."""
    wanted = math.ceil(current * overload - 1e-9)
    return min(max_step, max(1, wanted - current))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _clamp(count: int, bounds: tuple[int, int]) -> int:
    return min(max(count, bounds[0]), bounds[1])


class _RoleSignal(NamedTuple):
    """What one role's load asks for."""

    add: int  # instances to add (0: no breach)
    is_low: bool  # low enough to remove one instance
    why: str


def _describe(role: str, before: int, after: int, why: str) -> str:
    if before == after:
        return f"{role} hold at {before}: {why}"
    return f"{role} {before}->{after}: {why}"


def _decide(view: PlannerView, targets: dict[str, tuple[int, str]]) -> PlannerDecision:
    """The decision from each role's (target count, why)."""
    (num_prefill, why_prefill), (num_decode, why_decode) = targets["prefill"], targets["decode"]
    reason = "; ".join(
        (
            _describe("prefill", view.num_prefill, num_prefill, why_prefill),
            _describe("decode", view.num_decode, num_decode, why_decode),
        )
    )
    return PlannerDecision(num_prefill, num_decode, reason)


# --- Planners -----------------------------------------------------------------------------------


class FixedPlanner:
    """Never changes the counts (the deployment's own num_prefill / num_decode)."""

    name = "fixed"

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config

    def plan(self, view: PlannerView) -> PlannerDecision:
        return PlannerDecision(view.num_prefill, view.num_decode, "fixed: counts never change")


@dataclass
class _RoleClock:
    """One role's timers in the slo planner."""

    last_change_s: float | None = None
    low_since_s: float | None = None  # when the load last went low, None: not low now


class SLOPlanner:
    """raycake's planner: each role against its own SLO, with hysteresis and cool-downs.

    Prefill: the p90 over instances of the predicted TTFT of a new request, as a fraction of the
    TTFT SLO; above ``scale_up_at`` (or with over ``reject_up_fraction`` of the window's
    requests rejected, since rejected requests never queue and so never show in TTFT) add
    ``proportional_step`` instances. Remove one when the p90 queue wait is below
    ``scale_down_at`` (the own prefill, which no instance count shortens, is left out) and the
    p90 TTFT with one fewer stays below ``scale_up_at``, with no rejection.
    Decode: the p90 TBT as a fraction of the TBT SLO, and the mean KV or batch-slot
    utilisation (the higher) against ``kv_scale_up_at`` / ``kv_scale_down_at``; either breach
    adds, both low removes one.
    Scale-down also needs the load of the remaining instances (n / (n - 1) times today's) to
    stay under the up threshold, so that removing one cannot by itself cause a scale-up, no
    rejection in the window (the view does not say which role caused it), and no instance of
    the role still starting (the load it will take is not in the signal yet).
    """

    name = "slo"

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._clocks = {"prefill": _RoleClock(), "decode": _RoleClock()}

    def plan(self, view: PlannerView) -> PlannerDecision:
        targets = {
            "prefill": self._apply("prefill", view, self._prefill_signal(view)),
            "decode": self._apply("decode", view, self._decode_signal(view)),
        }
        return _decide(view, targets)

    def _prefill_signal(self, view: PlannerView) -> _RoleSignal:
        config, count = self.config, view.num_prefill
        add, reasons, is_low = 0, [], False
        if view.rejected_fraction > config.reject_up_fraction:
            add = 1
            reasons.append(f"{view.rejected_fraction:.0%} of requests rejected")
        if view.ttft_slo_s is None or not view.prefill:
            reasons.append("no TTFT SLO" if view.ttft_slo_s is None else "no prefill stats yet")
            return _RoleSignal(add, False, ", ".join(reasons))
        ratio = percentile([s.predicted_ttft_s for s in view.prefill], 0.9) / view.ttft_slo_s
        reasons.append(f"p90 predicted TTFT {ratio:.2f}x SLO")
        if ratio > config.scale_up_at:
            add = max(add, proportional_step(count, ratio / config.scale_up_at, config.max_step))
        elif view.num_rejected == 0:
            is_low = count > 1 and self._prefill_low_with_one_fewer(view, count)
        return _RoleSignal(add, is_low, ", ".join(reasons))

    def _prefill_low_with_one_fewer(self, view: PlannerView, count: int) -> bool:
        """Low: the p90 queue wait is under ``scale_down_at``. And with one instance fewer, the
        queues grow by n / (n - 1) but the own prefill does not: the p90 TTFT must stay under
        ``scale_up_at``, so that removing one cannot by itself cause a scale-up. Judging the
        wait, not the TTFT, lets an idle role shrink even when one bare prefill is a large part
        of the SLO."""
        slo, grow = view.ttft_slo_s, count / (count - 1)
        assert slo is not None
        waits, ttfts = [], []
        for s in view.prefill:
            wait = s.predicted_ttft_s if s.queued_s is None else s.queued_s
            waits.append(wait)
            ttfts.append(s.predicted_ttft_s - wait + wait * grow)
        return (
            percentile(waits, 0.9) / slo < self.config.scale_down_at
            and percentile(ttfts, 0.9) / slo < self.config.scale_up_at
        )

    def _decode_signal(self, view: PlannerView) -> _RoleSignal:
        config, count = self.config, view.num_decode
        if not view.decode:
            return _RoleSignal(0, False, "no decode stats yet")
        # Capacity: KV blocks or batch slots, whichever runs out first.
        kv = max(
            _mean([s.kv_utilization for s in view.decode]),
            _mean([s.slot_utilization for s in view.decode]),
        )
        add, reasons = 0, [f"mean KV/slot use {kv:.2f}"]
        tbt_low = True  # no SLO or no token in the window: TBT does not hold a scale-down
        if kv > config.kv_scale_up_at:
            add = proportional_step(count, kv / config.kv_scale_up_at, config.max_step)
        tbts = [s.tbt_s for s in view.decode if s.tbt_s is not None]
        if view.tbt_slo_s is not None and tbts:
            ratio = percentile(tbts, 0.9) / view.tbt_slo_s
            reasons.append(f"p90 TBT {ratio:.2f}x SLO")
            if ratio > config.scale_up_at:
                step = proportional_step(count, ratio / config.scale_up_at, config.max_step)
                add = max(add, step)
            tbt_low = ratio < config.scale_down_at
        is_low = (
            add == 0
            and tbt_low
            and view.num_rejected == 0
            and kv < config.kv_scale_down_at
            and _fits_one_fewer(kv, count, config.kv_scale_up_at)
        )
        return _RoleSignal(add, is_low, ", ".join(reasons))

    def _apply(self, role: str, view: PlannerView, signal: _RoleSignal) -> tuple[int, str]:
        """The role's next count under its bounds, cool-down and down-stable timers."""
        config, clock, now = self.config, self._clocks[role], view.now_s
        current, bounds = getattr(view, f"num_{role}"), config.bounds(role)
        if _clamp(current, bounds) != current:  # bounds are hard: no timer holds them back
            clock.last_change_s, clock.low_since_s = now, None
            return _clamp(current, bounds), f"{signal.why}; back within [{bounds[0]}, {bounds[1]}]"
        if signal.is_low and len(getattr(view, role)) < current:
            # An instance still starting has not taken its share of the load yet: the low
            # load it shows is not the load the role will have once it serves.
            signal = signal._replace(is_low=False, why=f"{signal.why}; instances still starting")
        if not signal.is_low:
            clock.low_since_s = None
        elif clock.low_since_s is None:
            clock.low_since_s = now
        wait = 0.0 if clock.last_change_s is None else clock.last_change_s + config.cooldown_s - now
        if signal.add:
            target = min(current + signal.add, bounds[1])
            if target == current:
                return current, f"{signal.why}; at max"
            if wait > 0:
                return current, f"{signal.why}; cooling down ({wait:.0f}s left)"
            clock.last_change_s = now
            return target, signal.why
        if signal.is_low and current > bounds[0]:
            low_for = now - clock.low_since_s
            if low_for < config.down_stable_s:
                return current, f"{signal.why}; low for {low_for:.0f}/{config.down_stable_s:.0f}s"
            if wait > 0:
                return current, f"{signal.why}; cooling down ({wait:.0f}s left)"
            # The next removal waits for another down_stable_s of low load: one at a time.
            clock.last_change_s, clock.low_since_s = now, None
            return current - 1, f"{signal.why}, low for {low_for:.0f}s"
        return current, signal.why


def _fits_one_fewer(load: float, count: int, up_at: float) -> bool:
    """With one instance fewer, the same load (spread as 1/n) stays below the up threshold."""
    return count > 1 and load * count / (count - 1) < up_at


class DynamoThresholdPlanner:
    """NVIDIA Dynamo's load-based planner, from its docs (docs/architecture/planner.md, v0.2-0.3,
    and components/planner/src/dynamo/planner/defaults.py ``LoadPlannerDefaults``):

    - Prefill on the prefill queue, decode on the mean KV cache utilisation, each compared with
      a scale-up and a scale-down threshold every adjustment interval (here ``cooldown_s``;
      Dynamo's default is 180 s, 30 s in the first docs). Dynamo's queue thresholds count
      requests in its global prefill queue (5.0 / 0.2); the "load" target of its later planner
      compares queued prefill *tokens*, which is what raycake's instances report, per instance
      (``dynamo_queue_up_tokens`` / ``_down_tokens``, raycake's defaults: two 2048-token
      prefill batches queued / a quarter of one). KV: 0.9 up, 0.5 down (Dynamo's defaults).
    - At most one worker per role per interval ("to avoid over-compensation"); no adjustment
      while workers are still joining (Dynamo skips the interval when the worker set changed).
    - No decode scale-down in the 3 intervals after a decode scale-up (a new worker first fills
      its KV cache: ``NEW_DECODE_WORKER_GRACE_PERIOD``).
    - No prefill scale-up when the queue's trend (this interval vs the last), extrapolated
      3 intervals ahead, falls back under the threshold (``NEW_PREFILL_WORKER_QUEUE_BUFFER_PERIOD``).
    """

    name = "dynamo"
    DECODE_GRACE_INTERVALS = 3
    QUEUE_BUFFER_INTERVALS = 3

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._last_adjustment_s: float | None = None
        self._decode_grace_left = 0
        self._last_queue_tokens: float | None = None

    def plan(self, view: PlannerView) -> PlannerDecision:
        config = self.config
        since = None if self._last_adjustment_s is None else view.now_s - self._last_adjustment_s
        if since is not None and since < config.cooldown_s:
            why = f"next adjustment in {config.cooldown_s - since:.0f}s"
            return _decide(view, _hold_both(view, why))
        self._last_adjustment_s = view.now_s
        grace = self._decode_grace_left > 0
        self._decode_grace_left = max(0, self._decode_grace_left - 1)
        if len(view.prefill) < view.num_prefill or len(view.decode) < view.num_decode:
            return _decide(view, _hold_both(view, "workers still joining"))
        targets = {"prefill": self._prefill(view), "decode": self._decode(view, grace)}
        return _decide(view, targets)

    def _prefill(self, view: PlannerView) -> tuple[int, str]:
        config, count, bounds = self.config, view.num_prefill, self.config.bounds("prefill")
        if not view.prefill:
            return _clamp(count, bounds), "no prefill stats"
        queued = sum(s.queued_prefill_tokens for s in view.prefill) / count
        previous, self._last_queue_tokens = self._last_queue_tokens, queued
        why = f"{queued:.0f} queued prefill tokens per instance"
        if queued < config.dynamo_queue_down_tokens:
            return _clamp(count - 1, bounds), why
        if queued > config.dynamo_queue_up_tokens:
            trend = 0.0 if previous is None else queued - previous
            if queued + trend * self.QUEUE_BUFFER_INTERVALS <= config.dynamo_queue_up_tokens:
                return _clamp(count, bounds), f"{why}, draining on its own"
            return _clamp(count + 1, bounds), why
        return _clamp(count, bounds), why

    def _decode(self, view: PlannerView, grace: bool) -> tuple[int, str]:
        config, count, bounds = self.config, view.num_decode, self.config.bounds("decode")
        if not view.decode:
            return _clamp(count, bounds), "no decode stats"
        kv = _mean([s.kv_utilization for s in view.decode])
        why = f"mean KV use {kv:.2f}"
        if kv < config.dynamo_kv_down_at:
            if grace:
                return _clamp(count, bounds), f"{why}, new decode worker's grace period"
            return _clamp(count - 1, bounds), why
        if kv > config.dynamo_kv_up_at and count < bounds[1]:
            self._decode_grace_left = self.DECODE_GRACE_INTERVALS
            return count + 1, why
        return _clamp(count, bounds), why


def _hold_both(view: PlannerView, why: str) -> dict[str, tuple[int, str]]:
    return {"prefill": (view.num_prefill, why), "decode": (view.num_decode, why)}


class LlmdThresholdPlanner:
    """llm-d's workload variant autoscaler, saturation analyzer (llm-d/llm-d-workload-variant-
    autoscaler, docs/saturation-analyzer.md and deploy/configmap-saturation-scaling.yaml):

    - An instance is saturated at KV usage >= ``kvCacheThreshold`` (0.80) or queue length >=
      ``queueLengthThreshold`` (5). Over the non-saturated ones, the mean spare KV
      (threshold - usage) and spare queue (threshold - length); scale up by one when either is
      below its trigger (``kvSpareTrigger`` 0.1, ``queueSpareTrigger`` 3), or when all are
      saturated; never while an instance is still starting (no cascade scaling).
    - Scale down by one when, with the non-saturated instances' total load spread over one
      fewer of them (at least 2 of them), both spares stay at or above their triggers.
    - Each role is one "variant": decode reports KV usage and waiting requests; prefill its
      queued requests (its KV holds no long-lived requests, so it counts as 0).
    WVA reconciles about every 60 s; here every ``cooldown_s``.
    """

    name = "llmd"

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._last_reconcile_s: float | None = None

    def plan(self, view: PlannerView) -> PlannerDecision:
        config = self.config
        last = self._last_reconcile_s
        if last is not None and view.now_s - last < config.cooldown_s:
            why = f"next reconcile in {config.cooldown_s - (view.now_s - last):.0f}s"
            return _decide(view, _hold_both(view, why))
        self._last_reconcile_s = view.now_s
        prefill = [(0.0, s.num_queued_requests) for s in view.prefill]
        decode = [(s.kv_utilization, s.num_waiting) for s in view.decode]
        targets = {
            "prefill": self._saturation("prefill", view.num_prefill, prefill),
            "decode": self._saturation("decode", view.num_decode, decode),
        }
        return _decide(view, targets)

    def _saturation(self, role: str, count: int, loads: list[tuple[float, int]]) -> tuple[int, str]:
        """(target, why) from each reporting instance's (KV usage, queue length)."""
        config, bounds = self.config, self.config.bounds(role)
        if not loads:
            return _clamp(count, bounds), "no metrics"
        kv_limit, queue_limit = config.llmd_kv_cache_threshold, config.llmd_queue_length_threshold
        free = [(kv, q) for kv, q in loads if kv < kv_limit and q < queue_limit]
        if not free:
            spare_kv = spare_queue = 0.0
        else:
            spare_kv = _mean([kv_limit - kv for kv, _ in free])
            spare_queue = _mean([queue_limit - q for _, q in free])
        why = f"{len(loads) - len(free)}/{len(loads)} saturated, spare KV {spare_kv:.2f}"
        why += f", spare queue {spare_queue:.1f}"
        if spare_kv < config.llmd_kv_spare_trigger or spare_queue < config.llmd_queue_spare_trigger:
            if len(loads) < count:
                return _clamp(count, bounds), f"{why}; instances still starting"
            return _clamp(count + 1, bounds), why
        if len(free) >= 2 and count > bounds[0]:
            remaining = len(free) - 1
            kv_after = kv_limit - sum(kv for kv, _ in free) / remaining
            queue_after = queue_limit - sum(q for _, q in free) / remaining
            safe = kv_after >= config.llmd_kv_spare_trigger
            if safe and queue_after >= config.llmd_queue_spare_trigger:
                return _clamp(count - 1, bounds), f"{why}; safe to remove one"
        return _clamp(count, bounds), why


# --- By name ------------------------------------------------------------------------------------

PLANNERS: dict[str, type[Planner]] = {
    "slo": SLOPlanner,
    "dynamo": DynamoThresholdPlanner,
    "llmd": LlmdThresholdPlanner,
    "fixed": FixedPlanner,
}


def make_planner(config: PlannerConfig) -> Planner:
    """A fresh planner (with fresh timers) for ``config.name``."""
    require(isinstance(config, PlannerConfig), "planner", "a PlannerConfig", config)
    return PLANNERS[config.name](config)
