"""Autoscaling on the trace simulator: SLO attainment against paid instance-hours for fixed
deployments and the planners (raycake's ``slo``, NVIDIA Dynamo's and llm-d's), on
time-varying load.

    python -m benchmarks.autoscaling_sim [--trace FILE] [--requests N] [--startup S]

Cluster: the scheduling study's (each instance an 8 x A800 node running Llama-3-70B, roofline
step times, TTFT SLO 30 s, TBT SLO 0.1 s, the cache-aware conductor with the global store and
early rejection); the store is sized for 8 prefill instances in every run. Planners may run
1-8 instances per role, tick every 5 s; a new instance takes work 30 s after it is added.

Loads: a generated diurnal trace (4 -> 32 -> 4 requests/s over 20 minutes), a generated bursty
one (4 requests/s, bursts of 24 of about 3 minutes every 5 minutes or so) and the Mooncake
synthetic trace (two copies with disjoint prefixes) with its rate varied 0.25x -> 1.5x -> 0.25x
every 15 minutes (skipped with a message when the file is absent).

Runs: fixed at the minimum (1P + 1D) and at the maximum (8P + 8D), the planners, and fixed at
the peak counts (per role, the most instances any planner ran: a deployment sized for the
peak). ``slo early`` is the ``slo`` planner with ``scale_up_at=0.3`` (``scale_down_at=0.1``):
it adds prefill at 9 s of predicted TTFT instead of 24 s, and decode at a 30 ms TBT instead of
80 ms. NOTE: on the generated loads nearly every rejection in the planners' runs is for
"decode capacity": the conductor counts a request against its decode instance's 128 batch
slots from the moment it is scheduled (prefill queue included), and no planner's decode signal
(TBT, KV use, waiting requests) sees those slots, so decode stays at 1 while requests are
turned away.

Columns: SLO attainment over ALL requests, rejected ones being misses (``within_slo_share``),
instance-hours, and both against fixed-at-max and fixed-at-peak (hours as a ratio, the share as
a difference). Writes benchmarks/results/autoscaling_sim.{parquet,csv} and the instances over
time against the load to docs/images/autoscaling_instances.png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from benchmarks.common import positive_float, print_table, write_table
from benchmarks.scheduling_study import MOONCAKE_TRACE, cluster_config
from raycake.policies.planner import PlannerConfig
from raycake.sim.load_shapes import LoadShape, apply_load_shape, generate_varying_trace
from raycake.sim.results import SimulationResult, plot_instances
from raycake.sim.simulate import SimulationConfig, policy_from_name, simulate
from raycake.sim.traces import SyntheticTraceConfig, read_trace, repeat

PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "images" / "autoscaling_instances.png"
MIN_INSTANCES, MAX_INSTANCES = 1, 8
ROLES = ("prefill", "decode")
PLANNERS = {
    "slo": {"name": "slo"},
    "slo early": {"name": "slo", "scale_up_at": 0.3, "scale_down_at": 0.1},
    "dynamo": {"name": "dynamo"},
    "llmd": {"name": "llmd"},
}
COLUMNS = [
    "trace",
    "run",
    "requests",
    "rejected",
    "within_slo_share",
    "ttft_p90_s",
    "instance_hours",
    "mean_prefill",
    "mean_decode",
    "max_prefill",
    "max_decode",
    "hours_vs_max",
    "within_slo_vs_max",
    "hours_vs_peak",
    "within_slo_vs_peak",
]


def load_traces(num_requests: int, trace_path: Path) -> dict[str, pa.Table]:
    """The time-varying loads (see the module docstring)."""
    traces = {
        "diurnal": generate_varying_trace(
            SyntheticTraceConfig(num_requests=num_requests, rate_per_s=32.0, seed=1),
            LoadShape(shape="diurnal", low=0.125, peak=1.0, period_s=1200.0),
        ),
        "bursty": generate_varying_trace(
            SyntheticTraceConfig(num_requests=num_requests * 3 // 4, rate_per_s=32.0, seed=2),
            LoadShape(shape="bursty", low=0.125, peak=0.75, mean_calm_s=300, mean_burst_s=180),
        ),
    }
    if trace_path.is_file():
        mooncake = repeat(read_trace(trace_path), 2)
        traces["mooncake x(t)"] = apply_load_shape(
            mooncake, LoadShape(shape="diurnal", low=0.25, peak=1.5, period_s=900.0)
        )
    else:
        print(f"skipping the Mooncake trace: {trace_path} not found")
    return traces


def run_trace(trace: pa.Table, config: SimulationConfig) -> dict[str, SimulationResult]:
    """Every run on one trace, labelled as in the table."""

    def run(num_prefill: int, num_decode: int, **planner: object) -> SimulationResult:
        bounds = {"min_prefill": MIN_INSTANCES, "max_prefill": MAX_INSTANCES}
        bounds |= {"min_decode": MIN_INSTANCES, "max_decode": MAX_INSTANCES}
        run_config = replace(
            config,
            num_prefill=num_prefill,
            num_decode=num_decode,
            planner=PlannerConfig(**bounds, **planner),  # type: ignore[arg-type]
        )
        return simulate(trace, policy_from_name("cache_aware"), run_config)

    results = {
        "fixed min": run(MIN_INSTANCES, MIN_INSTANCES, name="fixed"),
        "fixed max": run(MAX_INSTANCES, MAX_INSTANCES, name="fixed"),
    }
    for label, planner in PLANNERS.items():
        results[label] = run(MIN_INSTANCES, MIN_INSTANCES, **planner)
    peak = [
        max(max(results[label].timeline.column(f"num_{role}").to_pylist()) for label in PLANNERS)
        for role in ROLES
    ]
    results[f"fixed peak {peak[0]}P+{peak[1]}D"] = run(*peak, name="fixed")
    return results


def rows_for(trace_name: str, results: dict[str, SimulationResult]) -> list[dict]:
    fixed_max = results["fixed max"].summary
    fixed_peak = next(r.summary for label, r in results.items() if label.startswith("fixed peak"))
    rows = []
    for label, result in results.items():
        s = result.summary
        counts = {role: result.timeline.column(f"num_{role}").to_pylist() for role in ROLES}
        rows.append(
            {
                "trace": trace_name,
                "run": label,
                "requests": s.num_requests,
                "rejected": s.num_rejected,
                "within_slo_share": s.effective_request_capacity,
                "ttft_p90_s": s.ttft_p90_s,
                "tbt_p90_s": s.tbt_p90_s,
                "instance_hours": s.instance_hours,
                "mean_prefill": s.prefill_instance_s / s.makespan_s,
                "mean_decode": s.decode_instance_s / s.makespan_s,
                "max_prefill": max(counts["prefill"]),
                "max_decode": max(counts["decode"]),
                "hours_vs_max": s.instance_hours / fixed_max.instance_hours,
                "within_slo_vs_max": s.effective_request_capacity
                - fixed_max.effective_request_capacity,
                "hours_vs_peak": s.instance_hours / fixed_peak.instance_hours,
                "within_slo_vs_peak": s.effective_request_capacity
                - fixed_peak.effective_request_capacity,
                "makespan_s": s.makespan_s,
                "wall_s": s.wall_s,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="Mooncake trace")
    parser.add_argument("--requests", type=int, default=22_000, help="diurnal trace size")
    parser.add_argument("--startup", type=positive_float, default=30.0, help="instance start-up s")
    args = parser.parse_args()

    config = replace(cluster_config(MAX_INSTANCES, MAX_INSTANCES), instance_startup_s=args.startup)
    rows, runs = [], {}
    for trace_name, trace in load_traces(args.requests, args.trace).items():
        started = time.perf_counter()
        runs[trace_name] = run_trace(trace, config)
        rows += rows_for(trace_name, runs[trace_name])
        print(
            f"{trace_name}: {trace.num_rows} requests x {len(runs[trace_name])} runs in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    print()
    print_table(rows, COLUMNS)
    path = write_table(rows, "autoscaling_sim")
    PLOT_PATH.parent.mkdir(parents=True, exist_ok=True)
    # One legend for all columns: "fixed peak" without its counts, which differ per trace.
    labelled = {
        trace: {
            "fixed peak" if label.startswith("fixed peak") else label: result
            for label, result in results.items()
        }
        for trace, results in runs.items()
    }
    plot_instances(labelled, PLOT_PATH)
    print(f"\nwrote {path} (and .csv), {PLOT_PATH}")


if __name__ == "__main__":
    main()
