"""``raycake simulate``: replay a Mooncake trace through a simulated cluster, one run or a sweep
over policies, (prefill, decode) instance counts and request-rate multipliers; with
``--planner``, autoscaled runs on a time-varying load (``cli_autoscaling``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from raycake.sim.cli_autoscaling import add_autoscaling_arguments, load_trace, run_planners
from raycake.sim.roofline import GPU_PRESETS, MODEL_PRESETS

# Columns of the printed table: (header, summary field, format).
_COLUMNS = (
    ("policy", "policy", "{}"),
    ("P", "num_prefill", "{}"),
    ("D", "num_decode", "{}"),
    ("rate", "rate", "{:g}x"),
    ("requests", "num_requests", "{}"),
    ("rejected", "num_rejected", "{}"),
    ("hit rate", "cache_hit_rate", "{:.1%}"),
    ("TTFT mean", "ttft_mean_s", "{:.2f} s"),
    ("TTFT p90", "ttft_p90_s", "{:.2f} s"),
    ("TBT p90", "tbt_p90_s", "{:.0f} ms"),
    ("SLO attain.", "slo_attainment", "{:.1%}"),
    ("eff. capacity", "effective_request_capacity", "{:.1%}"),
    ("goodput", "goodput_rps", "{:.2f} req/s"),
    ("util P/D", None, None),
    ("sim speed", "requests_per_wall_s", "{:,.0f} req/s"),
)


def _instance_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            prefill, decode = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected PxD pairs like 4x4,8x8, got {item!r}"
            ) from None
        if prefill < 1 or decode < 1:
            raise argparse.ArgumentTypeError(f"instance counts must be >= 1, got {item!r}")
        shapes.append((prefill, decode))
    return shapes


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simulate`` on the ``raycake`` command's subparsers."""
    p = subparsers.add_parser(
        "simulate",
        help="replay a Mooncake trace through a simulated disaggregated cluster (cost model)",
    )
    p.add_argument("--trace", help="Mooncake JSONL trace file (required unless --load)")
    p.add_argument("--prefill", type=int, help="prefill instances (default 8)")
    p.add_argument("--decode", type=int, help="decode instances (default 8)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPU_PRESETS))
    p.add_argument(
        "--model",
        default="llama3-70b",
        help=f"one of {sorted(MODEL_PRESETS)} or a Hugging Face config.json path",
    )
    p.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel GPUs per instance (default: the fewest of 1, 2, 4, 8 whose HBM "
        "holds the weights in at most half)",
    )
    p.add_argument("--mfu", type=float, default=0.5, help="share of peak FLOP/s reached")
    p.add_argument(
        "--policy", default="cache_aware", help="scheduling policy (see --sweep-policies)"
    )
    p.add_argument("--ttft-slo", type=float, default=30.0, help="seconds")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="seconds (mean of slowest 10%%)")
    p.add_argument(
        "--speed", type=float, default=1.0, help="arrival-rate multiplier (compresses timestamps)"
    )
    p.add_argument("--num-requests", type=int, help="only the first N requests")
    p.add_argument("--out", help="folder for per-request Parquet, summary CSV/Parquet and CDF PNG")
    p.add_argument("--sweep-policies", help="comma-separated policy names")
    p.add_argument("--sweep-instances", type=_instance_shapes, help="e.g. 4x4,8x8")
    p.add_argument(
        "--sweep-rates", type=_floats, help="rate multipliers (times --speed), e.g. 1,2,4"
    )
    p.add_argument("--no-early-rejection", action="store_true")
    p.add_argument("--predictive-rejection", action="store_true")
    p.add_argument(
        "--local-cache-only",
        action="store_true",
        help="no global KV store: prefixes only from each prefill instance's own cache",
    )
    p.add_argument(
        "--prefill-cache-blocks",
        type=int,
        help="local prefix cache per prefill instance, 512-token blocks (default: its free HBM)",
    )
    p.add_argument(
        "--store-capacity-blocks",
        type=int,
        help="global KV store capacity in blocks (default: unlimited; 0: no store)",
    )
    p.add_argument("--max-num-seqs", type=int, default=128, help="decode batch limit")
    p.add_argument("--prefill-chunk-tokens", type=int, help="chunked prefill (default: off)")
    p.add_argument("--seed", type=int, default=0, help="for the random policy")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON lines")
    p.add_argument("--no-progress", action="store_true")
    add_autoscaling_arguments(p)
    p.set_defaults(func=run_simulate)
    return p


def _model_shape(spec: str):
    from raycake.model.config import ModelConfig
    from raycake.sim.roofline import ModelShape, model_preset

    if spec.lower() in MODEL_PRESETS:
        return model_preset(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model: expected one of {sorted(MODEL_PRESETS)} or a config.json path")
    return ModelShape.from_model_config(
        ModelConfig.from_hf_config(json.loads(path.read_text())), name=path.parent.name or "model"
    )


def _roofline(args: argparse.Namespace):
    from raycake.sim.roofline import RooflineCostModel, gpu_preset

    gpu, model = gpu_preset(args.gpu), _model_shape(args.model)
    if args.tp is not None:
        return RooflineCostModel(gpu=gpu, model=model, tensor_parallel=args.tp, mfu=args.mfu)
    for tp in (1, 2, 4, 8):
        roofline = RooflineCostModel(gpu=gpu, model=model, tensor_parallel=tp, mfu=args.mfu)
        if roofline.weight_bytes <= 0.5 * gpu.hbm_bytes * tp:
            return roofline
    raise ValueError(f"--tp: {model.name} needs more than 8 x {gpu.name}; pass --tp")


def _format(rows: list[dict]) -> list[list[str]]:
    table = []
    for row in rows:
        cells = []
        for _, field, fmt in _COLUMNS:
            if field is None:
                cells.append(f"{row['prefill_utilization']:.0%}/{row['decode_utilization']:.0%}")
                continue
            value = row[field]
            if field == "tbt_p90_s":
                value *= 1000
            cells.append(
                "-" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
            )
        table.append(cells)
    return table


def _print_table(rows: list[list[str]]) -> None:
    headers = [header for header, _, _ in _COLUMNS]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
        for row in rows:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(show_header=True, header_style="bold")
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def run_simulate(args: argparse.Namespace) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from raycake.sim.results import plot_latency_cdfs
    from raycake.sim.simulate import POLICY_NAMES, SimulationConfig, policy_from_name, sweep
    from raycake.sim.traces import head, prefix_reuse_ceiling, read_trace

    if args.planner is None:
        args.prefill, args.decode = args.prefill or 8, args.decode or 8
    for name in ("prefill", "decode", "max_num_seqs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1")
    for name in ("ttft_slo", "tbt_slo", "speed", "rate"):
        if not 0 < getattr(args, name) < math.inf:
            raise ValueError(f"--{name.replace('_', '-')}: expected a number > 0")
    policies = (args.sweep_policies or args.policy).split(",")
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ValueError(
            f"--policy/--sweep-policies: unknown {unknown}; choose from {POLICY_NAMES}"
        )
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    if args.trace is None and args.load is None:
        raise ValueError("--trace: required unless --load generates a trace")
    speed = args.speed  # what the sweep still has to apply
    if args.planner is not None or args.load is not None:
        trace, speed = load_trace(args), 1.0  # sped up before the load shape
    else:
        trace = read_trace(args.trace)
        if args.num_requests is not None:
            trace = head(trace, args.num_requests)
    roofline = _roofline(args)
    overrides: dict[str, object] = {
        "ttft_slo_s": args.ttft_slo,
        "tbt_slo_s": args.tbt_slo,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
    }
    if args.prefill_cache_blocks is not None:
        overrides["prefill_cache_blocks"] = args.prefill_cache_blocks
    if args.store_capacity_blocks is not None:
        overrides["store_capacity_blocks"] = args.store_capacity_blocks
    if args.local_cache_only:
        overrides["store_capacity_blocks"] = 0
    config = SimulationConfig.from_roofline(
        roofline,
        num_prefill=args.prefill or 1,  # with --planner, set per planner in run_planners
        num_decode=args.decode or 1,
        max_num_seqs=args.max_num_seqs,
        **overrides,
    )
    print(
        f"trace {args.trace or 'generated'}: {trace.num_rows} requests; reuse ceiling with one unlimited cache "
        f"{prefix_reuse_ceiling(trace):.1%} of prompt tokens\n"
        f"instance: {roofline.tensor_parallel} x {roofline.gpu.name}, {roofline.model.name}; "
        f"decode KV {config.decode_kv_blocks} blocks; links "
        f"{config.transfer_bandwidth_bytes_per_s / 1e9:.0f} GB/s",
        file=sys.stderr,
    )

    def factory(name: str):
        return lambda: policy_from_name(
            name,
            enable_early_rejection=not args.no_early_rejection,
            predictive_rejection=args.predictive_rejection,
            use_store=not args.local_cache_only,
            seed=args.seed,
        )

    if args.planner is not None:
        return run_planners(args, trace, config, factory, out)
    result = sweep(
        trace,
        config,
        {name: factory(name) for name in policies},
        instances=args.sweep_instances,
        # The rate column is the total multiplier of the trace's arrival rate.
        rates=[speed * rate for rate in args.sweep_rates or (1.0,)],
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    rows = result.table.to_pylist()
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print_table(_format(rows))
    if out is not None:
        pq.write_table(result.table, out / "summary.parquet")
        pacsv.write_csv(result.table, out / "summary.csv")
        for (label, prefill, decode, rate), run in result.results.items():
            run.write_parquet(out / f"requests_{label}_{prefill}x{decode}_{rate:g}x.parquet")
        plot_latency_cdfs(
            {
                f"{label} {prefill}x{decode} {rate:g}x": run
                for (label, prefill, decode, rate), run in result.results.items()
            },
            out / "latency_cdf.png",
            ttft_slo_s=args.ttft_slo,
            tbt_slo_s=args.tbt_slo,
        )
        print(f"wrote {out}/summary.csv, requests_*.parquet, latency_cdf.png", file=sys.stderr)
    return 0
