"""Time-varying load: rate profiles, re-timing a trace to follow one, and generated diurnal and
bursty traces (for the autoscaling planners).

A profile ``m(t)`` is a rate multiplier over the re-timed trace's clock (seconds from its first
request). ``vary_rate`` moves a request sent ``u`` seconds into the original trace to the time
``T`` where ``integral_0^T m(t) dt = u``: where ``m`` is 2 the requests come twice as densely
as in the original, and the order and content of the requests never change. Applied to Poisson
arrivals at rate ``r`` this gives a non-homogeneous Poisson process at rate ``r * m(t)`` (the
time-rescaling theorem), which is how the generated traces are made.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, replace
from typing import Protocol

import pyarrow as pa

from raycake.sim.traces import SyntheticTraceConfig, generate_trace
from raycake.validation import check_choice, check_int, check_number, require

LOAD_SHAPES = ("diurnal", "bursty")


class RateProfile(Protocol):
    """A rate multiplier (> 0) at each second of the re-timed trace."""

    def __call__(self, t_s: float) -> float: ...


@dataclass(frozen=True, kw_only=True)
class DiurnalProfile:
    """A sinusoid from ``low`` (at ``phase_s``) up to ``peak`` (half a period later) and back."""

    low: float
    peak: float
    period_s: float
    phase_s: float = 0.0

    def __post_init__(self) -> None:
        check_number("diurnal.low", self.low, low=0, low_exclusive=True)
        check_number("diurnal.peak", self.peak, low=self.low)
        check_number("diurnal.period_s", self.period_s, low=0, low_exclusive=True)
        check_number("diurnal.phase_s", self.phase_s)

    def __call__(self, t_s: float) -> float:
        angle = 2 * math.pi * (t_s - self.phase_s) / self.period_s
        return self.low + (self.peak - self.low) * 0.5 * (1 - math.cos(angle))


@dataclass(frozen=True)
class StepProfile:
    """Piecewise constant: ``multipliers[i]`` from ``starts_s[i]`` until the next start (the last
    one holds for ever); ``starts_s`` begins at 0 and increases."""

    starts_s: tuple[float, ...]
    multipliers: tuple[float, ...]

    def __post_init__(self) -> None:
        starts, values = self.starts_s, self.multipliers
        require(
            isinstance(starts, tuple) and len(starts) >= 1 and starts[0] == 0,
            "step_profile.starts_s",
            "a non-empty tuple starting at 0",
            starts,
        )
        require(
            all(b > a for a, b in itertools.pairwise(starts)),
            "step_profile.starts_s",
            "increasing times",
            starts,
        )
        require(
            isinstance(values, tuple) and len(values) == len(starts),
            "step_profile.multipliers",
            f"a tuple of {len(starts)} multipliers (one per start)",
            values,
        )
        for value in values:
            check_number("step_profile.multipliers", value, low=0, low_exclusive=True)

    def __call__(self, t_s: float) -> float:
        return self.multipliers[max(0, bisect.bisect_right(self.starts_s, t_s) - 1)]


def bursty_profile(
    *,
    calm: float,
    burst: float,
    mean_calm_s: float,
    mean_burst_s: float,
    horizon_s: float,
    seed: int,
) -> StepProfile:
    """Calm and burst periods in turn (calm first), each lasting an exponentially distributed
    time with its mean, up to ``horizon_s`` (the last period then holds). On Poisson arrivals
    this is a two-state Markov-modulated Poisson process."""
    check_number("bursty.calm", calm, low=0, low_exclusive=True)
    check_number("bursty.burst", burst, low=calm)
    check_number("bursty.mean_calm_s", mean_calm_s, low=0, low_exclusive=True)
    check_number("bursty.mean_burst_s", mean_burst_s, low=0, low_exclusive=True)
    check_number("bursty.horizon_s", horizon_s, low=0)
    check_int("bursty.seed", seed)
    rng = random.Random(seed)
    starts, values, now, in_burst = [0.0], [calm], 0.0, False
    while True:
        now += rng.expovariate(1 / (mean_burst_s if in_burst else mean_calm_s))
        if now >= horizon_s:
            return StepProfile(tuple(starts), tuple(values))
        in_burst = not in_burst
        starts.append(now)
        values.append(burst if in_burst else calm)


def vary_rate(trace: pa.Table, profile: RateProfile, *, resolution_s: float = 0.1) -> pa.Table:
    """``trace`` re-timed so its arrival rate is ``profile(t)`` times its own (rows, their order
    and every other column unchanged). The profile's clock starts at the trace's first
    timestamp; it is integrated in steps of ``resolution_s`` at each step's midpoint, so a
    request moves by at most about ``resolution_s`` from its exact time."""
    check_number("vary_rate.resolution_s", resolution_s, low=0, low_exclusive=True)
    require(callable(profile), "vary_rate.profile", "a callable rate multiplier of time", profile)
    timestamps = trace.column("timestamp_ms").to_pylist()
    if not timestamps:
        return trace
    origin_ms = min(timestamps)
    retimed = [0] * len(timestamps)
    # Walk the new clock step by step; ``area`` is the integral of the profile up to ``step_s``.
    step_s, area = 0.0, 0.0
    multiplier = _multiplier(profile, 0.5 * resolution_s)
    for i in sorted(range(len(timestamps)), key=timestamps.__getitem__):
        target = (timestamps[i] - origin_ms) / 1000.0
        while area + multiplier * resolution_s < target:
            area += multiplier * resolution_s
            step_s += resolution_s
            multiplier = _multiplier(profile, step_s + 0.5 * resolution_s)
        retimed[i] = origin_ms + round(1000.0 * (step_s + (target - area) / multiplier))
    return trace.set_column(
        trace.schema.get_field_index("timestamp_ms"), "timestamp_ms", pa.array(retimed, pa.int64())
    )


def _multiplier(profile: RateProfile, t_s: float) -> float:
    value = profile(t_s)
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(
            f"vary_rate.profile: expected a multiplier > 0 at {t_s:g} s, got {value!r}"
        )
    return value


# --- Named shapes (the CLI's and the benchmark's) ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoadShape:
    """A named profile of rate multipliers: ``diurnal`` (a sinusoid from ``low`` to ``peak`` and
    back every ``period_s``, starting at ``low``) or ``bursty`` (calm at ``low``, bursts at
    ``peak``, periods of random length with means ``mean_calm_s`` / ``mean_burst_s``)."""

    shape: str = "diurnal"
    low: float = 0.25
    peak: float = 1.0
    period_s: float = 1800.0
    mean_calm_s: float = 300.0
    mean_burst_s: float = 90.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("load.shape", self.shape, LOAD_SHAPES)
        check_number("load.low", self.low, low=0, low_exclusive=True)
        check_number("load.peak", self.peak, low=self.low)
        for name in ("period_s", "mean_calm_s", "mean_burst_s"):
            check_number(f"load.{name}", getattr(self, name), low=0, low_exclusive=True)
        check_int("load.seed", self.seed)

    def profile(self, horizon_s: float) -> RateProfile:
        """The profile, defined at least over ``[0, horizon_s]``."""
        if self.shape == "diurnal":
            return DiurnalProfile(low=self.low, peak=self.peak, period_s=self.period_s)
        return bursty_profile(
            calm=self.low,
            burst=self.peak,
            mean_calm_s=self.mean_calm_s,
            mean_burst_s=self.mean_burst_s,
            horizon_s=horizon_s,
            seed=self.seed,
        )


def apply_load_shape(trace: pa.Table, shape: LoadShape) -> pa.Table:
    """``vary_rate`` of ``trace`` by ``shape``'s profile (long enough for the whole trace)."""
    require(isinstance(shape, LoadShape), "load", "a LoadShape", shape)
    timestamps = trace.column("timestamp_ms").to_pylist()
    span_s = (max(timestamps) - min(timestamps)) / 1000.0 if timestamps else 0.0
    # At no point is the rate below ``low`` times the original's: the re-timed span is shorter.
    return vary_rate(trace, shape.profile(span_s / shape.low))


def generate_varying_trace(config: SyntheticTraceConfig, shape: LoadShape) -> pa.Table:
    """A generated trace (``config``'s request mix, Poisson arrivals) whose rate is
    ``config.rate_per_s * m(t)`` for ``shape``'s multiplier ``m``."""
    require(isinstance(config, SyntheticTraceConfig), "trace", "a SyntheticTraceConfig", config)
    return apply_load_shape(generate_trace(replace(config, arrival="poisson")), shape)
