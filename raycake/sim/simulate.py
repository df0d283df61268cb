"""Trace-driven simulation of a disaggregated cluster on the real policy objects: one run
(``simulate``) or a grid of runs (``sweep``). The event loop is ``event_loop.SimulatedCluster``;
the configuration ``config.SimulationConfig``; the outputs ``results``. The coupled baseline
(prefill and decode on the same instances) is ``simulate_coupled`` (``coupled.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa

from raycake.policies.cluster_view import SchedulingPolicy
from raycake.sim.config import (
    POLICY_NAMES,
    SimulationConfig,
    StepTimer,
    policy_from_name,
)
from raycake.sim.coupled import CoupledConfig, simulate_coupled
from raycake.sim.event_loop import SimulatedCluster
from raycake.sim.results import (
    SimulationResult,
    SimulationSummary,
    plot_latency_cdfs,
    summaries_table,
)
from raycake.sim.traces import speed_up

__all__ = [
    "POLICY_NAMES",
    "CoupledConfig",
    "SimulationConfig",
    "SimulationResult",
    "SimulationSummary",
    "StepTimer",
    "SweepResult",
    "plot_latency_cdfs",
    "policy_from_name",
    "simulate",
    "simulate_coupled",
    "sweep",
]


def simulate(
    trace: pa.Table,
    policy: SchedulingPolicy,
    config: SimulationConfig,
    *,
    progress: bool = False,
    label: str | None = None,
) -> SimulationResult:
    """Replay ``trace`` (``read_trace``/``generate_trace`` schema) through the cluster of
    ``config``, scheduled by ``policy`` (a fresh object: policies keep state)."""
    if not isinstance(policy, SchedulingPolicy):
        raise ValueError(f"policy: expected a SchedulingPolicy, got {policy!r}")
    if not isinstance(config, SimulationConfig):
        raise ValueError(f"config: expected a SimulationConfig, got {config!r}")
    if trace.num_rows == 0:
        raise ValueError("trace: no requests")
    return SimulatedCluster(trace, policy, config).run(progress=progress, label=label)


@dataclass(frozen=True)
class SweepResult:
    # One row per run: policy label, num_prefill, num_decode, rate, then SimulationSummary.
    table: pa.Table
    # (policy label, num_prefill, num_decode, rate) -> that run.
    results: dict[tuple[str, int, int, float], SimulationResult]


def sweep(
    trace: pa.Table,
    config: SimulationConfig,
    policies: Mapping[str, Callable[[], SchedulingPolicy]],
    *,
    instances: Sequence[tuple[int, int]] | None = None,
    rates: Sequence[float] = (1.0,),
    progress: bool = False,
) -> SweepResult:
    """Every combination of policy (label -> factory of fresh objects), (prefill, decode)
    instance counts (default: the config's) and rate multiplier (``speed_up`` of the trace)."""
    if not policies:
        raise ValueError("policies: expected at least one policy")
    shapes = list(instances) if instances else [(config.num_prefill, config.num_decode)]
    results: dict[tuple[str, int, int, float], SimulationResult] = {}
    extras = []
    for rate in rates:
        scaled = trace if rate == 1 else speed_up(trace, rate)
        for num_prefill, num_decode in shapes:
            shaped = replace(config, num_prefill=num_prefill, num_decode=num_decode)
            for label, factory in policies.items():
                result = simulate(scaled, factory(), shaped, progress=progress, label=label)
                results[(label, num_prefill, num_decode, float(rate))] = result
                extras.append({"rate": float(rate)})
    summaries = [r.summary for r in results.values()]
    return SweepResult(table=summaries_table(summaries, extras), results=results)
