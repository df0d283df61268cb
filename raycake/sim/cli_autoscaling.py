"""``raycake simulate --planner NAMES``: the autoscaling planners on a time-varying load (a
generated diurnal or bursty trace, or a trace file with its rate varied by ``--load``), one run
per (policy, planner), compared on SLO attainment and paid instance-hours."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from raycake.policies.planner import PLANNER_NAMES, PlannerConfig
from raycake.sim.load_shapes import LOAD_SHAPES

# Columns of the printed table: (header, summary field or a function of the row).
_COLUMNS = (
    ("planner", lambda r: r["planner"]),
    ("policy", lambda r: r["policy"]),
    ("requests", lambda r: str(r["num_requests"])),
    ("rejected", lambda r: str(r["num_rejected"])),
    # Share of ALL requests served within both SLOs (a rejected request is a miss).
    ("within SLO", lambda r: f"{r['effective_request_capacity']:.1%}"),
    ("TTFT p90", lambda r: _maybe(r["ttft_p90_s"], "{:.2f} s")),
    ("TBT p90", lambda r: _maybe(r["tbt_p90_s"] * 1000, "{:.0f} ms")),
    ("inst-hours", lambda r: f"{r['instance_hours']:.2f}"),
    ("mean P/D", lambda r: f"{r['mean_prefill']:.1f}/{r['mean_decode']:.1f}"),
    ("max P/D", lambda r: f"{r['max_prefill']}/{r['max_decode']}"),
    ("util P/D", lambda r: f"{r['prefill_utilization']:.0%}/{r['decode_utilization']:.0%}"),
)


def _maybe(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else fmt.format(value)


def add_autoscaling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("autoscaling (with --planner)")
    g.add_argument(
        "--planner",
        help=f"comma-separated planners from {list(PLANNER_NAMES)}, one run each; instances "
        "start at --prefill/--decode (default: the planner's minimum)",
    )
    for role in ("prefill", "decode"):
        g.add_argument(f"--min-{role}", type=int, default=1, help=f"fewest {role} instances")
        g.add_argument(f"--max-{role}", type=int, default=8, help=f"most {role} instances")
    g.add_argument("--planner-interval", type=float, default=5.0, help="seconds between ticks")
    g.add_argument(
        "--startup", type=float, default=30.0, help="seconds before a new instance takes work"
    )
    g.add_argument("--cooldown", type=float, help="planner cool-down, seconds (default: its own)")
    g.add_argument(
        "--load",
        choices=LOAD_SHAPES,
        help="time-varying load: vary --trace's rate by this shape, or without --trace generate "
        "a trace (--num-requests, default 4000, at --rate req/s times the shape)",
    )
    g.add_argument("--load-low", type=float, default=0.25, help="rate multiplier at the trough")
    g.add_argument("--load-peak", type=float, default=1.0, help="rate multiplier at the peak")
    g.add_argument("--load-period", type=float, default=1800.0, help="diurnal period, seconds")
    g.add_argument("--calm-s", type=float, default=300.0, help="bursty: mean calm seconds")
    g.add_argument("--burst-s", type=float, default=90.0, help="bursty: mean burst seconds")
    g.add_argument("--rate", type=float, default=4.0, help="generated trace's base rate, req/s")


def load_trace(args: argparse.Namespace):
    """The trace the arguments ask for: read (and cut, sped up) and/or generated, then shaped."""
    from raycake.sim.load_shapes import LoadShape, apply_load_shape
    from raycake.sim.traces import SyntheticTraceConfig, generate_trace, head, read_trace, speed_up

    shape = None
    if args.load is not None:
        shape = LoadShape(
            shape=args.load,
            low=args.load_low,
            peak=args.load_peak,
            period_s=args.load_period,
            mean_calm_s=args.calm_s,
            mean_burst_s=args.burst_s,
            seed=args.seed,
        )
    if args.trace is None:
        if shape is None:
            raise ValueError("--trace: required unless --load generates a trace")
        generated = SyntheticTraceConfig(
            num_requests=args.num_requests or 4000, rate_per_s=args.rate, seed=args.seed
        )
        trace = generate_trace(generated)
    else:
        trace = read_trace(args.trace)
        if args.num_requests is not None:
            trace = head(trace, args.num_requests)
    if args.speed != 1:
        trace = speed_up(trace, args.speed)
    return trace if shape is None else apply_load_shape(trace, shape)


def planner_configs(args: argparse.Namespace) -> dict[str, PlannerConfig]:
    names = args.planner.split(",")
    unknown = [name for name in names if name not in PLANNER_NAMES]
    if unknown:
        raise ValueError(f"--planner: unknown {unknown}; choose from {list(PLANNER_NAMES)}")
    bounds = {
        f"{end}_{role}": getattr(args, f"{end}_{role}")
        for end in ("min", "max")
        for role in ("prefill", "decode")
    }
    extra = {} if args.cooldown is None else {"cooldown_s": args.cooldown}
    return {name: PlannerConfig(name=name, **bounds, **extra) for name in names}


def run_planners(args: argparse.Namespace, trace, config, policy_factory, out: Path | None) -> int:
    """One run per (policy, planner) on ``trace``; prints the table, writes ``out``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from raycake.sim.results import plot_instances
    from raycake.sim.simulate import simulate

    if args.sweep_instances or args.sweep_rates:
        raise ValueError("--sweep-instances/--sweep-rates: not with --planner (one load per run)")
    planners = planner_configs(args)
    policies = (args.sweep_policies or args.policy).split(",")
    results, rows = {}, []
    for policy in policies:
        for name, planner in planners.items():
            run_config = replace(
                config,
                num_prefill=args.prefill or planner.min_prefill,
                num_decode=args.decode or planner.min_decode,
                planner=planner,
                planner_interval_s=args.planner_interval,
                instance_startup_s=args.startup,
            )
            result = simulate(trace, policy_factory(policy)(), run_config, label=policy)
            results[(policy, name)] = result
            rows.append(summary_row(result))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print(rows)
    if out is not None:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, out / "summary.parquet")
        pacsv.write_csv(table, out / "summary.csv")
        for (policy, name), result in results.items():
            result.write_parquet(out / f"requests_{policy}_{name}.parquet")
            pq.write_table(result.timeline, out / f"timeline_{policy}_{name}.parquet")
        trace_name = Path(args.trace).stem if args.trace else f"generated {args.load}"
        labels = {
            (policy, name): name if len(policies) == 1 else f"{name} {policy}"
            for policy, name in results
        }
        plot_instances(
            {trace_name: {labels[key]: result for key, result in results.items()}},
            out / "instances.png",
        )
        print(f"wrote {out}/summary.csv, requests_*, timeline_*, instances.png", file=sys.stderr)
    return 0


def summary_row(result) -> dict:
    """The summary plus the mean and peak paid instances per role."""
    summary = result.summary
    row = summary.to_dict()
    for role in ("prefill", "decode"):
        row[f"mean_{role}"] = row[f"{role}_instance_s"] / summary.makespan_s
        counts = (
            [row[f"num_{role}"]]
            if result.timeline is None
            else result.timeline.column(f"num_{role}").to_pylist()
        )
        row[f"max_{role}"] = max(counts)
    row["planner"] = row["planner"] or "none"
    return row


def _print(rows: list[dict]) -> None:
    headers = [header for header, _ in _COLUMNS]
    cells = [[cell(row) for _, cell in _COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
