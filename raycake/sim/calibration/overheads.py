"""What the simulator's steps take on the real local cluster: engine step costs plus the
cluster's overheads, fitted to replayed requests (other requests than the ones evaluated).

Engine steps alone predict a fraction of what the driver sees on this machine: every request
also pays conductor and actor calls, KV export and publish, and a streamed delta per token, and
on 2 shared cores the prefill actor, the decode actor, the driver and other users' processes
slow each other down. None of that is in a GPU cluster's cost model, and it depends on load, so
it is measured where it happens: on replayed requests, at the evaluated rate and at the same
time (other users' load on a shared machine changes from one minute to the next).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa

from raycake.policies.cluster_view import SchedulingPolicy
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.calibration.driver_timed import simulate_as_driver
from raycake.sim.calibration.replay import ReplayedRequest
from raycake.sim.config import SimulationConfig


@dataclass(frozen=True, kw_only=True)
class ClusterOverheads:
    """How a request's time on the cluster relates to the engine's step costs, as the simulator
    applies it: ``scale * engine seconds + fixed seconds`` per prefill and per decode step.

    The fixed parts are calls and copies (conductor and actor calls, KV export and publish; the
    deltas the decode actor yields and the driver awaits); the scales are compute slowed down
    by CPUs shared with the other actors, the driver and other users' processes.
    ``handoff_s``: from the KV landing on the decode instance to the request joining its batch
    (fetch and import of the KV, start of the token stream); it falls in the first token
    interval. ``decode_interval_ratios``: the later token intervals seen by the driver over
    their request's mean (stalls, deltas that arrive in clumps); simulated decode steps are
    drawn from this empirical distribution. Empty: every step takes its mean.
    """

    prefill_fixed_s: float = 0.0
    prefill_compute_scale: float = 1.0
    decode_step_s: float = 0.0
    decode_compute_scale: float = 1.0
    handoff_s: float = 0.0
    decode_interval_ratios: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in (
            "prefill_fixed_s",
            "prefill_compute_scale",
            "decode_step_s",
            "decode_compute_scale",
            "handoff_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"overheads.{name}: expected a finite number >= 0, got {value!r}")
        ratios = self.decode_interval_ratios
        if not isinstance(ratios, tuple) or not all(
            isinstance(r, float) and 0 <= r < math.inf for r in ratios
        ):
            raise ValueError(
                "overheads.decode_interval_ratios: expected a tuple of finite floats >= 0, "
                f"got {str(ratios)[:80]}"
            )


@dataclass(frozen=True, kw_only=True)
class CalibratedStepTimer:
    """A ``StepTimer``: engine step costs with the engine's prefill chunking, plus overheads;
    decode steps drawn from the measured interval distribution (seeded; ``reset`` restarts the
    draws, so one timer gives the same run twice).

    NOTE: the simulator calls ``prefill_seconds`` once per prefill (``prefill_chunk_tokens`` is
    left None), so the per-request overhead is paid once while every chunk pays the engine's
    fixed step cost, as on the real instance."""

    engine: StepCostModel
    max_prefill_chunk: int
    overheads: ClusterOverheads = field(default_factory=ClusterOverheads)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.engine, StepCostModel):
            raise ValueError(f"timer.engine: expected a StepCostModel, got {self.engine!r}")
        if not isinstance(self.max_prefill_chunk, int) or self.max_prefill_chunk < 1:
            raise ValueError(
                f"timer.max_prefill_chunk: expected an integer >= 1, got {self.max_prefill_chunk!r}"
            )
        if not isinstance(self.overheads, ClusterOverheads):
            raise ValueError(f"timer.overheads: expected ClusterOverheads, got {self.overheads!r}")
        self.reset()

    def reset(self) -> None:
        # The draws are the timer's only state; the frozen fields stay its configuration.
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def engine_prefill_seconds(self, num_new_tokens: int, num_cached_tokens: int) -> float:
        seconds = 0.0
        while num_new_tokens > 0:
            size = min(self.max_prefill_chunk, num_new_tokens)
            seconds += self.engine.prefill_seconds(size, num_cached_tokens)
            num_cached_tokens += size
            num_new_tokens -= size
        return seconds

    def prefill_seconds(self, num_new_tokens: int, num_cached_tokens: int) -> float:
        if num_new_tokens == 0:
            return 0.0
        o = self.overheads
        engine_s = self.engine_prefill_seconds(num_new_tokens, num_cached_tokens)
        return o.prefill_compute_scale * engine_s + o.prefill_fixed_s

    def mean_decode_step_seconds(self, batch_size: float, total_context_tokens: float) -> float:
        if batch_size == 0:
            return 0.0
        o = self.overheads
        engine_s = self.engine.decode_step_seconds(batch_size, total_context_tokens)
        return o.decode_compute_scale * engine_s + o.decode_step_s

    def decode_step_seconds(self, batch_size: float, total_context_tokens: float) -> float:
        mean = self.mean_decode_step_seconds(batch_size, total_context_tokens)
        ratios = self.overheads.decode_interval_ratios
        if not ratios or mean == 0:
            return mean
        return mean * self._rng.choice(ratios)  # type: ignore[attr-defined]


# Candidate overheads searched by ``fit_overheads``: compute scales (x engine seconds) and fixed
# seconds per prefill or per decode step.
COMPUTE_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
PREFILL_FIXED_S = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1)
DECODE_FIXED_S = (0.0, 0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03)
HANDOFF_S = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06)


def _log_error(pairs: list[tuple[float, float]]) -> float:
    """Mean |log(simulated / real)|: relative misses either way weigh alike."""
    return statistics.fmean(abs(math.log(sim / real)) for real, sim in pairs)


def fit_overheads(
    replayed: list[ReplayedRequest],
    trace: pa.Table,
    config: SimulationConfig,
    timer: CalibratedStepTimer,
    policy_factory: Callable[[], SchedulingPolicy],
    fit_indices: Sequence[int] | None = None,
) -> ClusterOverheads:
    """Overheads under which the simulated replay best matches the real one, request by request.

    The interval ratios are read off the real intervals. The prefill (fixed, scale) pair is
    chosen from a grid by the mean |log(simulated / real TTFT)| over the requests at
    ``fit_indices`` (default: all), each candidate a full simulation, so queueing behind slower
    prefills is in the fit; then the decode pair, the hand-off (grid values and the directly
    measured median, ``_handoff_seconds``) and the decode pair again, likewise by the mean
    token interval, with the prefill pair fixed. A grid, not a
    fixed-point iteration: under bursts, simulated queues react steeply to the overheads and
    residual updates oscillate. The requests outside ``fit_indices`` do not inform the fit.
    """
    indices = list(range(len(replayed))) if fit_indices is None else list(fit_indices)
    if not indices or not all(isinstance(i, int) and 0 <= i < len(replayed) for i in indices):
        raise ValueError(
            f"fit_indices: expected indices of replayed requests (0..{len(replayed) - 1}), "
            f"got {indices[:8]}"
        )
    served = [i for i in indices if replayed[i].finish_reason in ("stop", "length")]
    if not served:
        raise ValueError("replayed: no request at fit_indices was served by the cluster")
    handoff_s = _handoff_seconds([replayed[i] for i in served], config)

    def loss(overheads: ClusterOverheads, column: str) -> float:
        current = replace(timer, overheads=overheads)
        result = simulate_as_driver(
            trace, policy_factory(), replace(config, step_timer=current), overheads.handoff_s
        )
        simulated = result.requests.column(column).to_pylist()
        rejected = result.requests.column("rejected").to_pylist()
        real = [getattr(replayed[i], column) for i in served]
        pairs = [
            (a, simulated[i])
            for a, i in zip(real, served, strict=True)
            if not rejected[i] and a > 0 and simulated[i] > 0 and math.isfinite(a + simulated[i])
        ]
        return _log_error(pairs) if pairs else math.inf

    prefill = min(
        (
            ClusterOverheads(handoff_s=handoff_s, prefill_fixed_s=fixed, prefill_compute_scale=k)
            for k in COMPUTE_SCALES
            for fixed in PREFILL_FIXED_S
        ),
        key=lambda o: loss(o, "ttft_s"),
    )

    def best_decode(start: ClusterOverheads) -> ClusterOverheads:
        return min(
            (
                replace(start, decode_step_s=fixed, decode_compute_scale=k)
                for k in COMPUTE_SCALES
                for fixed in DECODE_FIXED_S
            ),
            key=lambda o: loss(o, "mean_token_interval_s"),
        )

    # Decode pair, then the hand-off by the same loss (the directly measured median is set by
    # busy periods; an idle instance takes the KV at once), then the pair again.
    overheads = best_decode(prefill)
    overheads = min(
        (replace(overheads, handoff_s=h) for h in (*HANDOFF_S, handoff_s)),
        key=lambda o: loss(o, "mean_token_interval_s"),
    )
    overheads = best_decode(overheads)
    ratios = []
    for r in (replayed[i] for i in served):
        later = r.token_intervals_s[1:]
        mean = sum(later) / len(later) if later else 0.0
        if mean > 0:
            ratios += [gap / mean for gap in later]
    return replace(overheads, decode_interval_ratios=tuple(sorted(ratios)))


def _handoff_seconds(replayed: list[ReplayedRequest], config: SimulationConfig) -> float:
    """The median first token interval beyond what the simulator puts there already: the KV
    transfer and one decode step (the request's mean later interval)."""
    seconds_per_token = config.kv_block_bytes / config.block_size
    seconds_per_token /= config.transfer_bandwidth_bytes_per_s
    excess = []
    for r in replayed:
        if r.finish_reason not in ("stop", "length") or len(r.token_intervals_s) < 2:
            continue
        later = r.token_intervals_s[1:]
        step_s = sum(later) / len(later)
        transfer_s = r.num_prompt_tokens * seconds_per_token
        excess.append(r.token_intervals_s[0] - step_s - transfer_s)
    return max(0.0, statistics.median(excess)) if excess else 0.0
