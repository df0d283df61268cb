"""How fast the trace simulator runs: a 24,000-request trace on 8 prefill + 8 decode instances.

    python -m benchmarks.simulator_speed [--trace FILE] [--num-requests 24000]

Goal (issue 7): under 30 s per run on a 2-core machine. The trace is the Mooncake synthetic
trace (../shared/data/mooncake/synthetic_trace.jsonl, 3,993 requests) repeated with disjoint
hash ids up to ``--num-requests``, and a generated trace of the same size. Also prints the
reuse-ceiling sanity check: with one unlimited cache and requests that never overlap, the
simulated hit rate must equal ``prefix_reuse_ceiling`` (the NOTES give ~65% for the synthetic
trace).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import print_table, write_table
from raycake.sim.roofline import RooflineCostModel, gpu_preset, model_preset
from raycake.sim.simulate import SimulationConfig, policy_from_name, simulate
from raycake.sim.traces import (
    SyntheticTraceConfig,
    generate_trace,
    head,
    prefix_reuse_ceiling,
    read_trace,
    repeat,
    speed_up,
)

MOONCAKE_SYNTHETIC = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake" / "synthetic_trace.jsonl"
)
GOAL_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(MOONCAKE_SYNTHETIC))
    parser.add_argument("--num-requests", type=int, default=24_000)
    args = parser.parse_args()

    roofline = RooflineCostModel(
        gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    config = SimulationConfig.from_roofline(
        roofline, num_prefill=8, num_decode=8, ttft_slo_s=30.0, tbt_slo_s=0.1
    )
    traces = {}
    if Path(args.trace).is_file():
        base = read_trace(args.trace)
        copies = -(-args.num_requests // base.num_rows)
        traces["mooncake-synthetic"] = (base, head(repeat(base, copies), args.num_requests))
    generated = generate_trace(
        SyntheticTraceConfig(num_requests=args.num_requests, rate_per_s=24.0, seed=0)
    )
    traces["generated"] = (head(generated, 4000), generated)

    rows = []
    for trace_name, (small, trace) in traces.items():
        for policy in ("random", "least_loaded", "cache_aware"):
            for rate in (1.0, 2.0):
                started = time.perf_counter()
                summary = simulate(speed_up(trace, rate), policy_from_name(policy), config).summary
                wall = time.perf_counter() - started
                rows.append(
                    {
                        "trace": trace_name,
                        "policy": policy,
                        "rate": rate,
                        "instances": "8P+8D",
                        "requests": summary.num_requests,
                        "rejected": summary.num_rejected,
                        "hit_rate": summary.cache_hit_rate,
                        "ttft_mean_s": summary.ttft_mean_s,
                        "wall_s": wall,
                        "requests_per_s": summary.num_requests / wall,
                        "under_goal": wall < GOAL_S,
                    }
                )
                print(
                    f"{trace_name} {policy} {rate:g}x: {summary.num_requests} requests in "
                    f"{wall:.2f} s ({summary.num_requests / wall:,.0f} requests/s)",
                    flush=True,
                )
        # Cache accounting check: one prefill instance, unlimited caches, no overlap in time.
        idle = speed_up(small, 0.01)
        check = simulate(
            idle,
            policy_from_name("cache_aware"),
            SimulationConfig.from_roofline(
                roofline, num_prefill=1, num_decode=1, prefill_cache_blocks=None
            ),
        ).summary
        print(
            f"{trace_name}: reuse ceiling (one unlimited cache) {prefix_reuse_ceiling(small):.2%}, "
            f"simulated hit rate {check.cache_hit_rate:.2%} on {small.num_rows} requests"
        )
    print()
    print_table(rows, list(rows[0]))
    path = write_table(rows, "simulator_speed")
    print(f"\nwrote {path} (and .csv)")


if __name__ == "__main__":
    main()
