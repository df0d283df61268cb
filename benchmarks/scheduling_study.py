"""Which scheduling policy serves the most requests within SLO: Mooncake's cache-aware conductor
against the baselines it was published with and against SGLang's and Dynamo's routers, on the
trace simulator (the very policy objects the conductor runs) at rising request rates.

    python -m benchmarks.scheduling_study [--trace FILE ...] [--rates 1 1.5 1.75 2 3 4]
                                          [--requests N] [--no-generated]

Cluster (the paper's setup): 8 prefill + 8 decode instances, each an 8 x A800 node running
Llama-3-70B (roofline step times), TTFT SLO 30 s, TBT SLO 0.1 s (the mean of a request's slowest
10% of token intervals). Each prefill instance caches prefixes in its KV memory; the global store
pools the same memory (8 x one instance's), so local-only and global runs have equal capacity.

Traces: the Mooncake synthetic trace in ../shared/data/mooncake (skipped with a message when
absent), two generated ones (multi-turn chat sessions; tool/agent calls over many shared
contexts) and any Mooncake-format file passed with --trace. Rates are trace speed multipliers.

Policies: random, round_robin, least_loaded, sglang_cache_aware, dynamo_kv, each as published
(admitting every request) and with the conductor's early-rejection rule applied to its choice
(``+admit``: ``AdmissionControl``, reject when the chosen pair's predicted TTFT or TBT exceeds the
SLO or its decode instance has no room), and the cache-aware conductor with instance-local caches
(``local``) or the global store (``global``), each without admission control, with early
rejection (``+early``) and with prediction-based early rejection (``+predictive``). Goals,
printed as PASS/FAIL per trace:
1. the cache-aware conductor as Mooncake deploys it (global store + early rejection) serves
   >= 20% more requests within both SLOs than the best baseline (random ... dynamo_kv) at the
   first swept rate where that best one meets both SLOs for under 90% of requests (where "they
   start failing"), compared twice: with the baselines as published (no admission control),
   and with the baselines under the same admission rule (``+admit``, at the rate where the best
   of those starts failing): the second shows what cache-aware placement adds beyond admission
   control. The conductor without early rejection against the published baselines is printed
   beside them;
2. the global store's cache hit rate is >= the local-only one at every rate and rejection mode.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from benchmarks.common import RESULTS_DIR, positive_float, print_table, write_table
from raycake.policies.cluster_view import SchedulingPolicy
from raycake.policies.scheduling import scheduling_policy_from_config
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.sim.roofline import RooflineCostModel, gpu_preset, model_preset
from raycake.sim.simulate import SimulationConfig, policy_from_name, simulate
from raycake.sim.traces import (
    TRACE_BLOCK_SIZE,
    SyntheticTraceConfig,
    generate_trace,
    read_trace,
    speed_up,
)

MOONCAKE_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake" / "synthetic_trace.jsonl"
)
DEFAULT_RATES = (1.0, 1.5, 1.75, 2.0, 3.0, 4.0)
TTFT_SLO_S, TBT_SLO_S = 30.0, 0.1
# "Start failing": the best of the others meets both SLOs for under this share of requests.
FAILING_SHARE = 0.9
GOAL_MARGIN = 1.2  # the conductor serves >= 20% more requests within SLO

# The paper's published comparisons (Mooncake, FAST'25; conversation trace, 16 instances).
PAPER_MEAN_TTFT_S = {
    "random": 19.65,
    "least_loaded": 5.27,  # "load balancing"
    "cache_aware local": 3.58,
    "cache_aware global": 3.07,
}
PAPER_REJECTED_AT_2X = {"none": 4183, "early": 3771, "predictive": 3589}  # 8P + 8D

OTHERS = ("random", "round_robin", "least_loaded", "sglang_cache_aware", "dynamo_kv")
# The same baselines under the conductor's early-rejection rule (AdmissionControl).
ADMITTED = tuple(f"{name}+admit" for name in OTHERS)
CONDUCTOR = "cache_aware global+early"
CONDUCTOR_NO_ADMISSION = "cache_aware global"
REJECTION_MODES = {"": {"enable_early_rejection": False}, "+early": {}}
REJECTION_MODES["+predictive"] = {"predictive_rejection": True}
COLUMNS = [
    "trace",
    "policy",
    "rate",
    "requests",
    "within_slo",
    "within_slo_share",
    "goodput_rps",
    "ttft_mean_s",
    "ttft_p90_s",
    "tbt_mean_s",
    "cache_hit_rate",
    "rejected",
]


def policy_factories() -> dict[str, Callable[[], SchedulingPolicy]]:
    """Study label -> a factory of fresh policy objects (policies keep state)."""
    factories: dict[str, Callable[[], SchedulingPolicy]] = {
        name: (lambda name=name: policy_from_name(name)) for name in OTHERS
    }
    for name, label in zip(OTHERS, ADMITTED, strict=True):
        factories[label] = lambda name=name: scheduling_policy_from_config(
            SchedulingConfig(policy=name, baseline_admission=True)
        )
    for store, use_store in (("local", False), ("global", True)):
        for suffix, options in REJECTION_MODES.items():
            factories[f"cache_aware {store}{suffix}"] = (
                lambda use_store=use_store, options=options: policy_from_name(
                    "cache_aware", use_store=use_store, **options
                )
            )
    return factories


def cluster_config(num_prefill: int = 8, num_decode: int = 8) -> SimulationConfig:
    """The paper's cluster: each instance one 8 x A800 node running Llama-3-70B."""
    roofline = RooflineCostModel(
        gpu=gpu_preset("a800"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    # Each prefill instance caches in the KV memory its HBM leaves; the store pools as much.
    instance_cache_blocks = roofline.kv_capacity_blocks(TRACE_BLOCK_SIZE)
    return SimulationConfig.from_roofline(
        roofline,
        num_prefill=num_prefill,
        num_decode=num_decode,
        ttft_slo_s=TTFT_SLO_S,
        tbt_slo_s=TBT_SLO_S,
        prefill_cache_blocks=instance_cache_blocks,
        store_capacity_blocks=num_prefill * instance_cache_blocks,
    )


def generated_traces(num_requests: int) -> dict[str, pa.Table]:
    """Multi-turn chat (long, growing sessions, like Mooncake's conversation trace) and tool /
    agent calls (200 shared 16k-token contexts: more than one instance's cache holds, less
    than the store's), Poisson arrivals at a base rate of 8 requests/s."""
    multi_turn = SyntheticTraceConfig(
        num_requests=num_requests,
        rate_per_s=8.0,
        session_share=1.0,
        agent_share=0.0,
        turns_per_session=6,
        first_turn_tokens=6000,
        turn_growth_tokens=1500,
        mean_output_tokens=300,
        seed=1,
    )
    tool_agent = SyntheticTraceConfig(
        num_requests=num_requests,
        rate_per_s=8.0,
        session_share=0.0,
        agent_share=1.0,
        num_agent_contexts=200,
        agent_context_tokens=16000,
        mean_output_tokens=150,
        seed=2,
    )
    return {"multi_turn": generate_trace(multi_turn), "tool_agent": generate_trace(tool_agent)}


def run_study(
    traces: dict[str, pa.Table],
    rates: Sequence[float],
    config: SimulationConfig,
    factories: dict[str, Callable[[], SchedulingPolicy]] | None = None,
    *,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    """Every (trace, rate, policy) run: the table's rows, and the results by key for plots."""
    factories = factories or policy_factories()
    rows, results = [], {}
    for trace_name, trace in traces.items():
        started = time.perf_counter()
        for rate in rates:
            scaled = trace if rate == 1 else speed_up(trace, rate)
            for label, factory in factories.items():
                result = simulate(scaled, factory(), config, label=label)
                results[(trace_name, label, float(rate))] = result
                rows.append(summary_row(trace_name, label, float(rate), result.summary))
        log(
            f"{trace_name}: {trace.num_rows} requests x {len(rates)} rates x "
            f"{len(factories)} policies in {time.perf_counter() - started:.1f} s"
        )
    return rows, results


def summary_row(trace: str, policy: str, rate: float, summary) -> dict:
    within = round(summary.effective_request_capacity * summary.num_requests)
    return {
        "trace": trace,
        "policy": policy,
        "rate": rate,
        "requests": summary.num_requests,
        "within_slo": within,
        "within_slo_share": summary.effective_request_capacity,
        "goodput_rps": summary.goodput_rps,
        "ttft_mean_s": summary.ttft_mean_s,
        "ttft_p90_s": summary.ttft_p90_s,
        "tbt_mean_s": summary.tbt_mean_s,
        "cache_hit_rate": summary.cache_hit_rate,
        "rejected": summary.num_rejected,
    }


@dataclass(frozen=True)
class GoalCheck:
    trace: str
    goal: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} [{self.trace}] {self.goal}: {self.detail}"


def _best_other(rows: list[dict], trace: str, rate: float, group: tuple[str, ...] = OTHERS) -> dict:
    candidates = [r for r in rows if r["trace"] == trace and r["rate"] == rate]
    candidates = [r for r in candidates if r["policy"] in group]
    return max(candidates, key=lambda r: r["within_slo"])


def _first_failing_rate(rows: list[dict], trace: str, group: tuple[str, ...]) -> float | None:
    """The first swept rate at which the best policy of ``group`` meets both SLOs for under
    ``FAILING_SHARE`` of the requests; None if none does."""
    rates = sorted({r["rate"] for r in rows if r["trace"] == trace})
    return next(
        (
            rate
            for rate in rates
            if _best_other(rows, trace, rate, group)["within_slo_share"] < FAILING_SHARE
        ),
        None,
    )


def _row(rows: list[dict], trace: str, policy: str, rate: float) -> dict:
    return next(r for r in rows if (r["trace"], r["policy"], r["rate"]) == (trace, policy, rate))


def check_goals(rows: list[dict]) -> list[GoalCheck]:
    """The study's goals per trace, from the table's rows alone."""
    checks = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        rates = sorted({r["rate"] for r in rows if r["trace"] == trace})
        for label, policy, group, others in (
            ("conductor (global + early rejection)", CONDUCTOR, OTHERS, "other"),
            (
                "conductor (global + early rejection)",
                CONDUCTOR,
                ADMITTED,
                "other under the same admission rule (+admit)",
            ),
            ("without admission control (global)", CONDUCTOR_NO_ADMISSION, OTHERS, "other"),
        ):
            goal = f"{label} serves >= {GOAL_MARGIN - 1:.0%} more within SLO than the best {others}"
            failing = _first_failing_rate(rows, trace, group)
            if failing is None:
                checks.append(
                    GoalCheck(
                        trace,
                        goal,
                        False,
                        f"no swept rate makes the others fail (best >= {FAILING_SHARE:.0%} within "
                        f"SLO up to x{rates[-1]:g}); sweep higher rates",
                    )
                )
                continue
            best = _best_other(rows, trace, failing, group)
            ours = _row(rows, trace, policy, failing)
            ratio = ours["within_slo"] / best["within_slo"] if best["within_slo"] else math.inf
            checks.append(
                GoalCheck(
                    trace,
                    goal,
                    ratio >= GOAL_MARGIN,
                    f"at x{failing:g} (best other {best['policy']}: {best['within_slo']} of "
                    f"{best['requests']}, {best['within_slo_share']:.1%}) {policy}: "
                    f"{ours['within_slo']} ({ours['within_slo_share']:.1%}), ratio {ratio:.2f}",
                )
            )
        margins = []  # (global - local hit rate, rate, rejection mode, global, local)
        for rate in rates:
            for suffix in REJECTION_MODES:
                glob = _row(rows, trace, f"cache_aware global{suffix}", rate)["cache_hit_rate"]
                local = _row(rows, trace, f"cache_aware local{suffix}", rate)["cache_hit_rate"]
                margins.append((glob - local, rate, suffix or " (no rejection)", glob, local))
        worst = min(margins)
        below = [f"x{rate:g}{mode}" for margin, rate, mode, _, _ in margins if margin < 0]
        checks.append(
            GoalCheck(
                trace,
                "global-store hit rate >= local-only hit rate (every rate and rejection mode)",
                not below,
                f"smallest margin at x{worst[1]:g}{worst[2]}: global {worst[3]:.1%} vs local "
                f"{worst[4]:.1%}" + (f"; below at {', '.join(below)}" if below else ""),
            )
        )
    return checks


def print_paper_comparison(rows: list[dict], trace: str) -> None:
    """Our numbers on ``trace`` beside the paper's (its conversation trace, 16 instances)."""
    rates = sorted({r["rate"] for r in rows if r["trace"] == trace})
    print(f"\nMean TTFT (s), paper (conversation trace) vs this study ({trace}, no rejection):")
    table = []
    for policy, paper in PAPER_MEAN_TTFT_S.items():
        row = {"policy": policy, "paper": paper}
        for rate in rates:
            row[f"x{rate:g}"] = _row(rows, trace, policy, rate)["ttft_mean_s"]
        table.append(row)
    print_table(table, list(table[0]))
    rate = min(rates, key=lambda r: abs(r - 2.0))
    print(f"\nEarly rejection, 8P + 8D: paper at 2x vs this study ({trace}) at x{rate:g}:")
    table = []
    for mode, paper in PAPER_REJECTED_AT_2X.items():
        ours = _row(rows, trace, f"cache_aware global{'' if mode == 'none' else '+' + mode}", rate)
        table.append(
            {
                "rejection": mode,
                "paper_rejected": paper,
                "rejected": ours["rejected"],
                "within_slo": ours["within_slo"],
                "ttft_mean_s": ours["ttft_mean_s"],
            }
        )
    print_table(table, list(table[0]))


def plot(rows: list[dict], path: Path) -> Path:
    """Share of requests within SLO and mean TTFT against the rate, one row per trace."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r["trace"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 3.6 * len(traces)), squeeze=False)
    palette = plt.get_cmap("tab20").colors  # 11 policies: more than tab10's colours
    colours = {policy: palette[(2 * i) % 20 + (2 * i) // 20] for i, policy in enumerate(policies)}
    for (share_ax, ttft_ax), trace in zip(axes, traces, strict=True):
        for policy in policies:
            points = sorted(
                (r["rate"], r["within_slo_share"], r["ttft_mean_s"])
                for r in rows
                if (r["trace"], r["policy"]) == (trace, policy)
            )
            style = "-" if policy.startswith("cache_aware") else "--"
            rates = [p[0] for p in points]
            for ax, values in (
                (share_ax, [p[1] for p in points]),
                (ttft_ax, [p[2] for p in points]),
            ):
                ax.plot(rates, values, style, marker="o", color=colours[policy], label=policy)
        share_ax.axhline(FAILING_SHARE, color="grey", linewidth=1, linestyle=":")
        share_ax.set_title(f"{trace}: requests within both SLOs")
        share_ax.set_ylabel("share of all requests")
        ttft_ax.set_title(f"{trace}: mean TTFT of served requests")
        ttft_ax.set_ylabel("seconds")
        ttft_ax.set_yscale("log")
        ttft_ax.axhline(TTFT_SLO_S, color="grey", linewidth=1, linestyle=":")
        for ax in (share_ax, ttft_ax):
            ax.set_xlabel("trace speed (x)")
            ax.grid(True, alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trace",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a Mooncake-format JSONL trace to study as well (repeatable)",
    )
    parser.add_argument(
        "--rates",
        nargs="+",
        type=positive_float,
        default=list(DEFAULT_RATES),
        help="trace speed multipliers (default: %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="requests per generated trace (default: %(default)s)",
    )
    parser.add_argument(
        "--no-generated",
        action="store_true",
        help="skip the generated multi-turn and tool/agent traces",
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests: expected an integer >= 1, got {args.requests}")
    args.rates = sorted(set(args.rates))
    return args


def load_traces(args: argparse.Namespace) -> dict[str, pa.Table]:
    traces: dict[str, pa.Table] = {}
    if MOONCAKE_TRACE.exists():
        traces["mooncake_synthetic"] = read_trace(MOONCAKE_TRACE)
    else:
        print(f"skipping the Mooncake synthetic trace: {MOONCAKE_TRACE} not found")
    if not args.no_generated:
        traces.update(generated_traces(args.requests))
    for path in args.trace:
        traces[path.stem] = read_trace(path)  # TraceFormatError names bad lines
    return traces


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    traces = load_traces(args)
    if not traces:
        print("no traces to study")
        return 1
    config = cluster_config()
    print(
        f"cluster: {config.num_prefill}P + {config.num_decode}D, 8 x A800 per instance, "
        f"llama3-70b; TTFT SLO {TTFT_SLO_S:g} s, TBT SLO {TBT_SLO_S:g} s; prefix cache "
        f"{config.prefill_cache_blocks} blocks per prefill instance, store "
        f"{config.store_capacity_blocks} blocks"
    )
    started = time.perf_counter()
    rows, _ = run_study(traces, args.rates, config)
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s\n")
    print_table(rows, COLUMNS)
    print(f"\nsaved {write_table(rows, 'scheduling_study')}")
    print(f"saved {plot(rows, RESULTS_DIR / 'scheduling_study.png')}")
    paper_trace = "mooncake_synthetic" if "mooncake_synthetic" in traces else next(iter(traces))
    print_paper_comparison(rows, paper_trace)
    print()
    checks = check_goals(rows)
    for check in checks:
        print(check.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
