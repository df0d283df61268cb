"""Is the simulator right about this machine? Fit its step costs from the real engine, replay a
small Mooncake-format trace on the local Ray cluster and in the simulator, compare per request.

    .venv/bin/python -m benchmarks.simulator_calibration [--requests 60] [--rate 5]

Goal (issue 7, item 4): median relative error of TTFT and of TBT within 25%. Variants:
calibrated (engine steps + overheads cross-fitted on other requests of the same replay + token
interval spread; per request the median of 15 seeded simulations), no_jitter (every decode step its mean), engine_only (engine step costs alone),
real_repeat (a second real replay of the same trace: the run-to-run noise floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from benchmarks.common import print_table, write_table
from raycake.cluster.config import ClusterConfig
from raycake.sim.calibration.calibrate import calibrate_simulator, calibration_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=5.0, help="mean arrivals per second")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds")
    args = parser.parse_args()

    import ray

    from raycake.cluster.cluster import Cluster

    started = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # 2 cores here: over-subscribe logical CPUs so every actor can be placed.
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR")
    cluster = Cluster(
        ClusterConfig(
            namespace="raycake-calibration", num_prefill=args.prefill, num_decode=args.decode
        )
    )
    try:
        trace = calibration_trace(args.requests, args.rate, args.seed)
        report = calibrate_simulator(cluster, trace, num_folds=args.folds, seed=args.seed)
    finally:
        cluster.shutdown()
        ray.shutdown()

    steps = report.step_measurements
    print(
        f"engine steps: {len(steps.prefill)} prefill + {len(steps.decode)} decode shapes "
        f"({steps.raw_steps} steps, {steps.seconds:.1f} s, {steps.torch_threads} torch thread(s)); "
        f"fit median error {report.step_fit_median_rel_error:.1%}"
    )
    print(f"fitted engine cost model: {report.engine_cost_model}")
    print(f"KV transfer (object store): {report.transfer_bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    ratios = report.overheads.decode_interval_ratios
    print(
        f"overheads (all requests): {report.overheads}; token interval / request mean: p10 "
        f"{ratios[len(ratios) // 10]:.2f}, p50 {ratios[len(ratios) // 2]:.2f}, p90 "
        f"{ratios[9 * len(ratios) // 10]:.2f}"
    )
    for k, overheads in enumerate(report.fold_overheads):
        print(f"  fitted without fold {k} (which they predict): {overheads}")
    print(
        f"replay: {args.requests} requests at {args.rate}/s on {args.prefill}P+{args.decode}D, "
        f"block size {report.sim_config.block_size}, policy {cluster.config.scheduling.policy}"
    )
    rows = []
    for c in report.comparisons:
        row = dataclasses.asdict(c)
        goal_applies = c.metric in ("ttft", "tbt") and c.variant == "calibrated"
        row["result"] = (
            ("PASS" if c.median_rel_error <= report.goal else "FAIL") if goal_applies else "-"
        )
        rows.append(row)
    print_table(
        rows,
        [
            "variant",
            "metric",
            "num_requests",
            "real_median_s",
            "sim_median_s",
            "real_mean_s",
            "sim_mean_s",
            "real_p90_s",
            "sim_p90_s",
            "median_rel_error",
            "p90_rel_error",
            "result",
        ],
    )
    data = report.requests.to_pydict()
    real_hit = sum(data["real_cached_tokens"]) / max(1, sum(data["num_prompt_tokens"]))
    sim_hit = sum(data["sim_cached_tokens"]) / max(1, sum(data["num_prompt_tokens"]))
    print(f"prompt tokens from cache: real {real_hit:.1%}, simulated {sim_hit:.1%}")
    print(f"max submit lag {max(data['start_lag_s']) * 1000:.1f} ms")
    verdict = "PASS" if report.passed else "FAIL"
    print(f"{verdict}: median TTFT and TBT errors vs the {report.goal:.0%} goal")
    write_table(rows, "simulator_calibration")
    path = write_table(report.requests.to_pylist(), "simulator_calibration_requests")
    print(f"wrote {path} and simulator_calibration.parquet ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
