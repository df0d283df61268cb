"""What a simulation run reports: per-request rows (a pyarrow table, written as Parquet), a
summary (SLO attainment, goodput, cache hit rate, effective request capacity, utilization,
latency percentiles) and a PNG of TTFT and TBT CDFs per policy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("arrival_s", pa.float64()),
        ("num_prompt_tokens", pa.int64()),
        ("num_output_tokens", pa.int64()),
        ("rejected", pa.bool_()),
        ("reject_reason", pa.string()),
        ("prefill_instance", pa.string()),
        ("decode_instance", pa.string()),
        # Prompt tokens served from the prefill instance's own cache, and fetched from the store.
        ("local_cached_tokens", pa.int64()),
        ("store_fetched_tokens", pa.int64()),
        ("predicted_ttft_s", pa.float64()),
        ("predicted_tbt_s", pa.float64()),
        ("queue_s", pa.float64()),  # arrival -> prefill start
        ("ttft_s", pa.float64()),  # arrival -> KV on the decode instance (first token out)
        # Mooncake's TBT: mean of the slowest 10% of token intervals; NaN for one-token outputs.
        ("tbt_s", pa.float64()),
        ("mean_token_interval_s", pa.float64()),
        ("e2e_s", pa.float64()),
        ("met_ttft_slo", pa.bool_()),
        ("met_tbt_slo", pa.bool_()),
    ]
)


class RequestRows:
    """Column lists filled as requests finish or are rejected (one append per column)."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in REQUEST_SCHEMA.names}
        self.trace_order: list[int] = []  # each row's line index in the trace

    def add(self, trace_index: int, **row) -> None:
        self.trace_order.append(trace_index)
        for name, column in self.columns.items():
            column.append(row[name])

    def to_table(self) -> pa.Table:
        """The rows in trace order (they are added in completion order)."""
        table = pa.table(self.columns, schema=REQUEST_SCHEMA)
        order = sorted(range(len(self.trace_order)), key=self.trace_order.__getitem__)
        return table.take(pa.array(order, pa.int64()))


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of an ascending list; NaN if empty."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class SimulationSummary:
    policy: str
    num_prefill: int
    num_decode: int
    num_requests: int
    num_rejected: int
    num_served: int
    makespan_s: float  # first arrival -> last completion
    # Among served requests: share meeting the TTFT SLO, the TBT SLO, and both.
    ttft_slo_attainment: float
    tbt_slo_attainment: float
    slo_attainment: float
    # Mooncake's effective request capacity: share of ALL requests (rejected ones included)
    # served within both SLOs.
    effective_request_capacity: float
    goodput_rps: float  # requests within both SLOs per second of makespan
    throughput_rps: float  # served requests per second of makespan
    cache_hit_rate: float  # cached prompt tokens / prompt tokens of served requests
    local_hit_rate: float
    store_hit_rate: float
    prefill_utilization: float  # mean busy share of the prefill instances over the makespan
    decode_utilization: float
    mean_decode_batch: float  # requests per decode step, averaged over steps
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tbt_mean_s: float
    tbt_p50_s: float
    tbt_p90_s: float
    tbt_p99_s: float
    wall_s: float
    requests_per_wall_s: float  # simulation speed
    # Autoscaling: the planner's name (None: fixed counts, num_prefill / num_decode throughout;
    # with a planner those are the counts at the start) and the paid instance time per role
    # over the makespan, starting and draining instances included.
    planner: str | None = None
    prefill_instance_s: float = math.nan
    decode_instance_s: float = math.nan
    instance_hours: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    table: pa.Table,
    *,
    policy: str,
    num_prefill: int,
    num_decode: int,
    prefill_busy_s: float,
    decode_busy_s: float,
    decode_steps: int,
    decode_step_tokens: int,
    wall_s: float,
    planner: str | None = None,
    prefill_instance_s: float | None = None,
    decode_instance_s: float | None = None,
) -> SimulationSummary:
    """The summary of a run from its per-request rows and the instances' busy times; paid
    instance seconds default to the fixed counts times the makespan."""
    rejected = table.column("rejected").to_pylist()
    arrivals = table.column("arrival_s").to_pylist()
    ends = [a + e for a, e in zip(arrivals, table.column("e2e_s").to_pylist(), strict=True)]
    served = [i for i, r in enumerate(rejected) if not r]
    first = min(arrivals) if arrivals else 0.0
    last = max((ends[i] for i in served), default=max(arrivals, default=0.0))
    makespan = max(last - first, 1e-9)
    ttft_all = table.column("ttft_s").to_pylist()
    ttft = sorted(ttft_all[i] for i in served)
    tbt_all = table.column("tbt_s").to_pylist()
    tbt = sorted(tbt_all[i] for i in served if not math.isnan(tbt_all[i]))
    met_ttft = table.column("met_ttft_slo").to_pylist()
    met_tbt = table.column("met_tbt_slo").to_pylist()
    num_ttft = sum(met_ttft[i] for i in served)
    num_tbt = sum(met_tbt[i] for i in served)
    num_both = sum(met_ttft[i] and met_tbt[i] for i in served)
    prompt = table.column("num_prompt_tokens").to_pylist()
    local = table.column("local_cached_tokens").to_pylist()
    fetched = table.column("store_fetched_tokens").to_pylist()
    prompt_tokens = sum(prompt[i] for i in served) or 1
    local_tokens = sum(local[i] for i in served)
    fetched_tokens = sum(fetched[i] for i in served)
    num_served = len(served)
    if prefill_instance_s is None:
        prefill_instance_s = num_prefill * makespan
    if decode_instance_s is None:
        decode_instance_s = num_decode * makespan

    def share(count: int, total: int) -> float:
        return count / total if total else math.nan

    return SimulationSummary(
        policy=policy,
        num_prefill=num_prefill,
        num_decode=num_decode,
        num_requests=len(rejected),
        num_rejected=len(rejected) - num_served,
        num_served=num_served,
        makespan_s=makespan,
        ttft_slo_attainment=share(num_ttft, num_served),
        tbt_slo_attainment=share(num_tbt, num_served),
        slo_attainment=share(num_both, num_served),
        effective_request_capacity=share(num_both, len(rejected)),
        goodput_rps=num_both / makespan,
        throughput_rps=num_served / makespan,
        cache_hit_rate=(local_tokens + fetched_tokens) / prompt_tokens,
        local_hit_rate=local_tokens / prompt_tokens,
        store_hit_rate=fetched_tokens / prompt_tokens,
        prefill_utilization=prefill_busy_s / prefill_instance_s,
        decode_utilization=decode_busy_s / decode_instance_s,
        mean_decode_batch=decode_step_tokens / decode_steps if decode_steps else 0.0,
        ttft_mean_s=sum(ttft) / len(ttft) if ttft else math.nan,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        tbt_mean_s=sum(tbt) / len(tbt) if tbt else math.nan,
        tbt_p50_s=percentile(tbt, 50),
        tbt_p90_s=percentile(tbt, 90),
        tbt_p99_s=percentile(tbt, 99),
        wall_s=wall_s,
        requests_per_wall_s=len(rejected) / wall_s if wall_s > 0 else math.inf,
        planner=planner,
        prefill_instance_s=prefill_instance_s,
        decode_instance_s=decode_instance_s,
        instance_hours=(prefill_instance_s + decode_instance_s) / 3600,
    )


@dataclass(frozen=True)
class SimulationResult:
    requests: pa.Table  # REQUEST_SCHEMA rows, in trace order
    summary: SimulationSummary
    # With a planner: autoscaling.TIMELINE_SCHEMA rows, one per tick; None: fixed counts.
    timeline: pa.Table | None = None

    def write_parquet(self, path: str | Path) -> Path:
        path = Path(path)
        pq.write_table(self.requests, path)
        return path


def summaries_table(
    summaries: list[SimulationSummary], extra: list[dict] | None = None
) -> pa.Table:
    """One row per run: ``extra`` columns (e.g. the sweep's rate) first, then the summary."""
    rows = [{**(extra[i] if extra else {}), **s.to_dict()} for i, s in enumerate(summaries)]
    return pa.Table.from_pylist(rows)


def plot_latency_cdfs(
    results: Mapping[str, SimulationResult],
    path: str | Path,
    *,
    ttft_slo_s: float | None = None,
    tbt_slo_s: float | None = None,
) -> Path:
    """A PNG with the TTFT and TBT CDFs of served requests, one line per labelled run."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, result in results.items():
        table = result.requests
        served = [not r for r in table.column("rejected").to_pylist()]
        for ax, column in zip(axes, ("ttft_s", "tbt_s"), strict=True):
            values = sorted(
                v
                for v, keep in zip(table.column(column).to_pylist(), served, strict=True)
                if keep and not math.isnan(v)
            )
            if values:
                n = len(values)
                ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)
    for ax, title, slo in (
        (axes[0], "TTFT (s)", ttft_slo_s),
        (axes[1], "TBT: mean of slowest 10% intervals (s)", tbt_slo_s),
    ):
        if slo is not None:
            ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("share of served requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_instances(
    runs: Mapping[str, Mapping[str, SimulationResult]], path: str | Path, *, bin_s: float = 60.0
) -> Path:
    """A PNG of instances over time against the load: one column per trace (``runs``: trace ->
    label -> result, the same trace in each column), rows for the request rate (arrivals per
    second in ``bin_s`` bins) and the paid prefill and decode instances of each run (a run
    without a planner is a flat line at its fixed counts)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig, axes = plt.subplots(
        3, len(runs), figsize=(5.2 * len(runs), 7.5), sharex="col", squeeze=False
    )
    for column, (trace_name, results) in enumerate(runs.items()):
        load_ax, prefill_ax, decode_ax = axes[:, column]
        arrivals = next(iter(results.values())).requests.column("arrival_s").to_pylist()
        start = min(arrivals)
        bins = [0] * (int((max(arrivals) - start) // bin_s) + 1)
        for arrival in arrivals:
            bins[int((arrival - start) // bin_s)] += 1
        # The last bin ends at the last arrival: its rate is over the part it covers.
        edges = [i * bin_s for i in range(len(bins))] + [max(arrivals) - start]
        edges[-1] = max(edges[-1], edges[-2] + 1.0)
        rates = [n / (b - a) for n, a, b in zip(bins, edges, edges[1:], strict=False)]
        load_ax.step(
            [edge / 60 for edge in edges],
            [*rates, rates[-1]],
            where="post",
            color="black",
        )
        load_ax.set_title(trace_name)
        load_ax.set_ylabel("requests / s")
        for label, result in results.items():
            summary = result.summary
            if result.timeline is None:
                times = [0.0, summary.makespan_s / 60]
                counts = {"prefill": [summary.num_prefill] * 2, "decode": [summary.num_decode] * 2}
            else:
                times = [(t - start) / 60 for t in result.timeline.column("time_s").to_pylist()]
                counts = {
                    role: result.timeline.column(f"num_{role}").to_pylist()
                    for role in ("prefill", "decode")
                }
            for ax, role in ((prefill_ax, "prefill"), (decode_ax, "decode")):
                ax.step(times, counts[role], where="post", label=label)
        prefill_ax.set_ylabel("prefill instances")
        decode_ax.set_ylabel("decode instances")
        decode_ax.set_xlabel("time (min)")
        for ax in axes[:, column]:
            ax.grid(True, alpha=0.3)
        for ax in (prefill_ax, decode_ax):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # One legend for every panel, below them: the runs are the same in each column.
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
