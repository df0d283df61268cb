"""Mooncake's headline: effective request capacity of disaggregated raycake over coupled
(vLLM-style) instances on the same number of instances, at TBT SLOs of 100, 200 and 300 ms.

    python -m benchmarks.mooncake_capacity [--requests N] [--instances N] [--steps K]
                                           [--no-generated]

Effective request capacity, here: the highest request rate (the trace's own rate times a speed
multiplier) at which >= 90% of ALL requests (rejected ones count as failures) meet both SLOs,
TTFT <= 30 s and TBT <= the threshold (TBT: the mean of a request's slowest 10% of token
intervals). Found per system and SLO by bisection over the multiplier: from x1, doubling or
halving until the 90% line is bracketed, then ``--steps`` geometric bisections. The FAST'25
paper's "effective request capacity" is instead the share of requests of one replayed trace
that meet both SLOs; that share at the trace's own rate (x1) is printed beside it.

Systems, on N instances of 8 x A800 running Llama-3-70B (steps timed by the roofline on both
sides; a coupled step is one pass over its prompt chunks and decode tokens):
- disaggregated: every split P + D = N, Mooncake's conductor (global store, early rejection);
  the best split is reported;
- coupled: N instances with chunked prefill (vLLM's default budget of 2,048 tokens per step and
  a TBT-friendly 512) and automatic prefix caching, behind SGLang's cache-aware router, with and
  without the conductor's admission rule; the best of the four is reported (``gain``), and the
  gain over vLLM's defaults without admission control (2,048, ``gain_vs_default``), nearer the
  paper's baseline.

Traces: the Mooncake synthetic trace (its first ``--requests``; skipped with a message when
absent) and the generated multi-turn and tool/agent traces of ``scheduling_study``. The paper's
gains on the synthetic trace (+62/+40/+28%) are the issue's figures; see the README.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import pyarrow as pa

from benchmarks.common import print_table, write_table
from benchmarks.scheduling_study import MOONCAKE_TRACE, cluster_config, generated_traces
from raycake.policies.admission_control import AdmissionControl
from raycake.sim.coupled import CoupledConfig, simulate_coupled
from raycake.sim.roofline import RooflineCostModel, gpu_preset, model_preset
from raycake.sim.simulate import policy_from_name, simulate
from raycake.sim.traces import head, read_trace, speed_up

TTFT_SLO_S = 30.0
TBT_SLOS_S = (0.1, 0.2, 0.3)
CAPACITY_SHARE = 0.9  # of all requests within both SLOs
COUPLED_BUDGETS = (2048, 512)  # max_num_batched_tokens
# Mooncake's gain over vLLM on its synthetic trace at each TBT SLO, as the issue quotes it.
PAPER_GAIN = {0.1: 0.62, 0.2: 0.40, 0.3: 0.28}
MAX_DOUBLINGS = 6  # capacities are searched within x1/64 .. x64
SUMMARY_COLUMNS = [
    "trace",
    "tbt_slo_ms",
    "disaggregated",
    "disagg_rps",
    "coupled",
    "coupled_rps",
    "gain",
    "gain_vs_default",
    "paper_gain",
    "disagg_share_x1",
    "coupled_share_x1",
]

# A system: (label, kind, does the SLO change what it does, run(trace, tbt_slo) -> rows).
Runner = Callable[[pa.Table, float], pa.Table]


def roofline() -> RooflineCostModel:
    return RooflineCostModel(
        gpu=gpu_preset("a800"), model=model_preset("llama3-70b"), tensor_parallel=8
    )


def systems(
    num_instances: int, budgets: Sequence[int] = COUPLED_BUDGETS
) -> list[tuple[str, str, bool, Runner]]:
    """Every disaggregated split and coupled variant on ``num_instances`` instances."""
    timer = roofline()
    found: list[tuple[str, str, bool, Runner]] = []
    for num_prefill in range(1, num_instances):
        base = replace(cluster_config(num_prefill, num_instances - num_prefill), step_timer=timer)

        def run(trace: pa.Table, tbt_slo: float, base=base) -> pa.Table:
            config = replace(base, ttft_slo_s=TTFT_SLO_S, tbt_slo_s=tbt_slo)
            return simulate(trace, policy_from_name("cache_aware"), config).requests

        found.append((f"{num_prefill}P+{num_instances - num_prefill}D", "disaggregated", True, run))
    for budget in budgets:
        for admit in (False, True):

            def run(trace: pa.Table, tbt_slo: float, budget=budget, admit=admit) -> pa.Table:
                config = CoupledConfig.from_roofline(
                    timer,
                    num_instances=num_instances,
                    ttft_slo_s=TTFT_SLO_S,
                    tbt_slo_s=tbt_slo,
                    max_num_batched_tokens=budget,
                )
                router = policy_from_name("sglang_cache_aware")
                return simulate_coupled(
                    trace, AdmissionControl(router) if admit else router, config
                ).requests

            label = f"{num_instances}M/{budget}" + ("+admit" if admit else "")
            found.append((label, "coupled", admit, run))
    return found


def share_within(requests: pa.Table, tbt_slo: float) -> float:
    """Share of all requests served with TTFT <= 30 s and TBT <= ``tbt_slo``."""
    rejected = requests.column("rejected").to_pylist()
    ttft = requests.column("ttft_s").to_pylist()
    tbt = requests.column("tbt_s").to_pylist()
    met = sum(
        not r and t <= TTFT_SLO_S and (math.isnan(b) or b <= tbt_slo)
        for r, t, b in zip(rejected, ttft, tbt, strict=True)
    )
    return met / len(rejected)


def capacity(share_at: Callable[[float], float], steps: int) -> float:
    """The highest speed multiplier found with ``share_at(x) >= CAPACITY_SHARE``: bracket from
    x1 by doubling or halving, then ``steps`` geometric bisections; 0 below x1/64."""
    low, high = (1.0, None) if share_at(1.0) >= CAPACITY_SHARE else (None, 1.0)
    for _ in range(MAX_DOUBLINGS):
        if low is not None and high is not None:
            break
        probe = 2 * low if high is None else high / 2  # type: ignore[operator]
        if share_at(probe) >= CAPACITY_SHARE:
            low = probe
        else:
            high = probe
    if low is None or high is None:
        return low or 0.0
    for _ in range(steps):
        middle = math.sqrt(low * high)
        if share_at(middle) >= CAPACITY_SHARE:
            low = middle
        else:
            high = middle
    return low


def base_rate_rps(trace: pa.Table) -> float:
    timestamps = trace.column("timestamp_ms").to_pylist()
    return trace.num_rows / max((max(timestamps) - min(timestamps)) / 1000, 1e-9)


def run_capacity(
    traces: dict[str, pa.Table],
    *,
    num_instances: int = 4,
    steps: int = 5,
    budgets: Sequence[int] = COUPLED_BUDGETS,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[dict]]:
    """(one summary row per trace and TBT SLO, one row per trace, SLO and system)."""
    summary, detail = [], []
    for trace_name, trace in traces.items():
        started, runs = time.perf_counter(), 0
        rate_rps = base_rate_rps(trace)
        for tbt_slo in TBT_SLOS_S:
            found = []
            for label, kind, slo_matters, run in systems(num_instances, budgets):
                cache = _RUNS.setdefault((trace_name, label, tbt_slo if slo_matters else None), {})

                def share_at(x: float, run=run, cache=cache, tbt_slo=tbt_slo, trace=trace) -> float:
                    nonlocal runs
                    if x not in cache:
                        cache[x] = run(trace if x == 1 else speed_up(trace, x), tbt_slo)
                        runs += 1
                    return share_within(cache[x], tbt_slo)

                multiplier = capacity(share_at, steps)
                found.append((kind, label, multiplier, share_at(1.0)))
                detail.append(
                    {
                        "trace": trace_name,
                        "tbt_slo_ms": round(tbt_slo * 1000),
                        "system": label,
                        "kind": kind,
                        "capacity_x": multiplier,
                        "capacity_rps": multiplier * rate_rps,
                        "share_x1": share_at(1.0),
                    }
                )
            best = {
                kind: max((f for f in found if f[0] == kind), key=lambda f: f[2])
                for kind in ("disaggregated", "coupled")
            }
            disagg, coupled = best["disaggregated"], best["coupled"]
            default = next(f for f in found if f[1] == f"{num_instances}M/{budgets[0]}")
            gain = disagg[2] / coupled[2] - 1 if coupled[2] else math.inf
            gain_default = disagg[2] / default[2] - 1 if default[2] else math.inf
            paper = PAPER_GAIN[tbt_slo] if trace_name == "mooncake_synthetic" else math.nan
            summary.append(
                {
                    "trace": trace_name,
                    "tbt_slo_ms": round(tbt_slo * 1000),
                    "disaggregated": disagg[1],
                    "disagg_rps": disagg[2] * rate_rps,
                    "coupled": coupled[1],
                    "coupled_rps": coupled[2] * rate_rps,
                    "gain": gain,
                    "gain_vs_default": gain_default,
                    "paper_gain": paper,
                    "disagg_share_x1": disagg[3],
                    "coupled_share_x1": coupled[3],
                }
            )
        log(f"{trace_name}: {runs} runs in {time.perf_counter() - started:.1f} s")
    _RUNS.clear()
    return summary, detail


# Runs by (trace, system, SLO when it changes the run), then speed multiplier: a system that
# ignores the SLO answers all three from the same runs.
_RUNS: dict[tuple[str, str, float | None], dict[float, pa.Table]] = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per trace")
    parser.add_argument("--instances", type=int, default=4, help="instances per system")
    parser.add_argument("--steps", type=int, default=5, help="bisection steps per capacity")
    parser.add_argument("--no-generated", action="store_true", help="the Mooncake trace only")
    args = parser.parse_args(argv)
    for name, low in (("requests", 1), ("instances", 2), ("steps", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected an integer >= {low}, got {getattr(args, name)}")
    return args


def load_traces(args: argparse.Namespace) -> dict[str, pa.Table]:
    traces: dict[str, pa.Table] = {}
    if MOONCAKE_TRACE.exists():
        traces["mooncake_synthetic"] = head(read_trace(MOONCAKE_TRACE), args.requests)
    else:
        print(f"skipping the Mooncake synthetic trace: {MOONCAKE_TRACE} not found")
    if not args.no_generated:
        traces.update(generated_traces(args.requests))
    return traces


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    traces = load_traces(args)
    if not traces:
        print("no traces to study")
        return 1
    print(
        f"{args.instances} instances of 8 x A800, llama3-70b, per system; TTFT SLO "
        f"{TTFT_SLO_S:g} s; capacity: the highest rate with >= {CAPACITY_SHARE:.0%} of requests "
        f"within both SLOs ({args.steps} bisection steps)"
    )
    for name, trace in traces.items():
        print(f"  {name}: {trace.num_rows} requests at {base_rate_rps(trace):.2f} req/s (x1)")
    summary, detail = run_capacity(traces, num_instances=args.instances, steps=args.steps)
    print()
    print_table(detail, list(detail[0]))
    print()
    print_table(summary, SUMMARY_COLUMNS)
    print(f"\nsaved {write_table(summary, 'mooncake_capacity')}")
    print(f"saved {write_table(detail, 'mooncake_capacity_systems')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
