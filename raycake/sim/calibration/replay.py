"""A Mooncake-format trace replayed on the real local cluster, at the trace's arrival times.

Trace blocks are 512 tokens; the embedded model has 2,048 positions and 16-token blocks. So a
trace is first mapped onto engine tokens (``trace_in_engine_blocks``): every 512-token trace
block becomes one engine block, keeping its hash id, and ``input_length`` becomes
``ceil(input_length * block_size / 512)``, which preserves the block count exactly (a trace
request of k full blocks + r tokens becomes k full engine blocks + a partial one). Output
lengths are engine tokens already (generate the trace with a small ``mean_output_tokens``).
The mapped trace is what the simulator runs with ``block_size`` = the engine's, and what
``prompt_tokens_for`` turns into real token ids: block j's tokens are drawn from a generator
seeded with hash_ids[j], so requests sharing leading hash ids share leading token blocks and
hit the real prefix caches exactly where the simulated ones hit.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass

import pyarrow as pa

from raycake.cluster.cluster import Cluster, ClusterOutput
from raycake.engine.sampling_params import SamplingParams
from raycake.sim.event_loop import TBT_SLOWEST_SHARE
from raycake.sim.traces import TRACE_BLOCK_SIZE, TRACE_SCHEMA


def trace_in_engine_blocks(trace: pa.Table, block_size: int, max_model_len: int) -> pa.Table:
    """``trace`` with each 512-token block mapped to one ``block_size``-token block (same hash
    ids, ``input_length`` scaled with a ceiling); ValueError when a request would not fit in
    ``max_model_len`` positions (prompt + output)."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
    if not isinstance(max_model_len, int) or max_model_len < 2:
        raise ValueError(f"max_model_len: expected an integer >= 2, got {max_model_len!r}")
    lengths = [
        max(1, -(-n * block_size // TRACE_BLOCK_SIZE))
        for n in trace.column("input_length").to_pylist()
    ]
    outputs = trace.column("output_length").to_pylist()
    for i, (n_in, n_out) in enumerate(zip(lengths, outputs, strict=True)):
        if n_in + n_out > max_model_len:
            raise ValueError(
                f"trace row {i}: {n_in} mapped prompt tokens + output_length {n_out} > "
                f"max_model_len {max_model_len}; generate shorter prompts or outputs"
            )
    return pa.Table.from_arrays(
        [
            trace.column("timestamp_ms"),
            pa.array(lengths, pa.int64()),
            trace.column("output_length"),
            trace.column("hash_ids"),
        ],
        schema=TRACE_SCHEMA,
    )


def prompt_tokens_for(
    hash_ids: list[int], num_tokens: int, block_size: int, vocab_size: int, seed: int = 0
) -> list[int]:
    """``num_tokens`` token ids whose block j depends only on ``hash_ids[j]`` (and ``seed``)."""
    if len(hash_ids) != -(-num_tokens // block_size):
        raise ValueError(
            f"hash_ids: expected ceil({num_tokens} / {block_size}) ids, got {len(hash_ids)}"
        )
    tokens: list[int] = []
    for h in hash_ids:
        rng = random.Random(f"{seed}:{h}")
        tokens += [rng.randrange(vocab_size) for _ in range(block_size)]
    return tokens[:num_tokens]


def slowest_share_tbt(intervals: list[float]) -> float:
    """Mooncake's TBT exactly as the simulator computes it: the mean of the slowest 10% (at
    least one) of a request's token intervals; NaN without intervals."""
    if not intervals:
        return math.nan
    slowest = max(1, math.ceil(TBT_SLOWEST_SHARE * len(intervals)))
    return sum(sorted(intervals, reverse=True)[:slowest]) / slowest


@dataclass(frozen=True)
class ReplayedRequest:
    """One trace request as the driver saw it."""

    index: int
    arrival_s: float  # seconds after the trace's first request
    start_lag_s: float  # how late the driver submitted it (event loop busy)
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str | None
    ttft_s: float  # submit -> prefill result at the driver (the first token)
    tbt_s: float  # mean of the slowest 10% of token intervals
    mean_token_interval_s: float
    token_intervals_s: tuple[float, ...]  # between consecutive tokens at the driver


def _row(index: int, arrival_s: float, lag_s: float, out: ClusterOutput) -> ReplayedRequest:
    intervals = out.tbt_s
    return ReplayedRequest(
        index=index,
        arrival_s=arrival_s,
        start_lag_s=lag_s,
        num_prompt_tokens=len(out.prompt_token_ids),
        num_output_tokens=len(out.token_ids),
        num_cached_tokens=out.num_cached_tokens,
        finish_reason=out.finish_reason,
        ttft_s=math.nan if out.ttft_s is None else out.ttft_s,
        tbt_s=slowest_share_tbt(intervals),
        mean_token_interval_s=sum(intervals) / len(intervals) if intervals else math.nan,
        token_intervals_s=tuple(intervals),
    )


def replay_on_cluster(
    cluster: Cluster, trace: pa.Table, vocab_size: int, seed: int = 0
) -> list[ReplayedRequest]:
    """Submit each request of an engine-block ``trace`` at its timestamp (greedy, exactly
    ``output_length`` tokens) and wait for all; rows in trace order."""
    block_size = cluster.block_size
    rows = list(
        zip(
            trace.column("timestamp_ms").to_pylist(),
            trace.column("input_length").to_pylist(),
            trace.column("output_length").to_pylist(),
            trace.column("hash_ids").to_pylist(),
            strict=True,
        )
    )
    prompts = [prompt_tokens_for(h, n, block_size, vocab_size, seed) for _, n, _, h in rows]

    first_ms = min(ts for ts, *_ in rows)

    async def one(index: int, start: float) -> ReplayedRequest:
        arrival_s = (rows[index][0] - first_ms) / 1000.0
        await asyncio.sleep(max(0.0, start + arrival_s - time.monotonic()))
        lag_s = time.monotonic() - start - arrival_s
        params = SamplingParams(temperature=0, max_tokens=rows[index][2], ignore_eos=True)
        out = await cluster.agenerate(prompts[index], params)
        return _row(index, arrival_s, lag_s, out)

    async def run_all() -> list[ReplayedRequest]:
        start = time.monotonic()
        return await asyncio.gather(*(one(i, start) for i in range(len(rows))))

    return asyncio.run(run_all())


def as_simulated(replayed: list[ReplayedRequest]) -> pa.Table:
    """A replay in the simulator's per-request columns, to compare two real replays."""
    return pa.table(
        {
            "rejected": [r.finish_reason == "rejected" for r in replayed],
            "local_cached_tokens": [r.num_cached_tokens for r in replayed],
            "store_fetched_tokens": [0] * len(replayed),
            "ttft_s": [r.ttft_s for r in replayed],
            "tbt_s": [r.tbt_s for r in replayed],
            "mean_token_interval_s": [r.mean_token_interval_s for r in replayed],
        }
    )


# (metric, column suffix) compared per request; the goal applies to TTFT and TBT.
COMPARED_METRICS = (
    ("ttft", "ttft_s"),
    ("tbt", "tbt_s"),
    ("mean_token_interval", "mean_token_interval_s"),
)


def paired_requests(replayed: list[ReplayedRequest], simulated: pa.Table) -> pa.Table:
    """One row per trace request: the real and the simulated timings side by side (simulated
    by ``driver_timed.simulate_as_driver``, so both TTFTs end at the prefill's first token)."""
    if simulated.num_rows != len(replayed):
        raise ValueError(
            f"simulated: expected {len(replayed)} rows (one per replayed request), "
            f"got {simulated.num_rows}"
        )
    sim = simulated.to_pydict()
    columns: dict[str, list] = {
        "index": [r.index for r in replayed],
        "arrival_s": [r.arrival_s for r in replayed],
        "start_lag_s": [r.start_lag_s for r in replayed],
        "num_prompt_tokens": [r.num_prompt_tokens for r in replayed],
        "num_output_tokens": [r.num_output_tokens for r in replayed],
        "real_finish_reason": [r.finish_reason for r in replayed],
        "sim_rejected": sim["rejected"],
        "real_cached_tokens": [r.num_cached_tokens for r in replayed],
        "sim_cached_tokens": [
            a + b
            for a, b in zip(sim["local_cached_tokens"], sim["store_fetched_tokens"], strict=True)
        ],
    }
    for _, name in COMPARED_METRICS:
        columns[f"real_{name}"] = [getattr(r, name) for r in replayed]
        columns[f"sim_{name}"] = sim[name]
    return pa.table(columns)


@dataclass(frozen=True)
class MetricComparison:
    """Real vs simulated values of one metric over the requests both served."""

    # The prediction: a simulated timer ("calibrated", "no_jitter", "engine_only") or a second
    # real replay ("real_repeat").
    variant: str
    metric: str
    num_requests: int
    real_median_s: float
    sim_median_s: float
    real_mean_s: float
    sim_mean_s: float
    real_p90_s: float
    sim_p90_s: float
    # Per request |sim - real| / real, then its median, 90th percentile and mean.
    median_rel_error: float
    p90_rel_error: float
    mean_rel_error: float


def _p90(values: list[float]) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def compare_metrics(paired: pa.Table, variant: str) -> list[MetricComparison]:
    """``COMPARED_METRICS`` summarised over the requests served by both (no rejection, no
    error, a finite value on each side)."""
    data = paired.to_pydict()
    served = [
        i
        for i in range(paired.num_rows)
        if data["real_finish_reason"][i] in ("stop", "length") and not data["sim_rejected"][i]
    ]
    comparisons = []
    for metric, name in COMPARED_METRICS:
        pairs = [
            (data[f"real_{name}"][i], data[f"sim_{name}"][i])
            for i in served
            if math.isfinite(data[f"real_{name}"][i])
            and math.isfinite(data[f"sim_{name}"][i])
            and data[f"real_{name}"][i] > 0
        ]
        if not pairs:
            raise ValueError(f"{metric}: no request has a real and a simulated value to compare")
        real = [a for a, _ in pairs]
        sim = [b for _, b in pairs]
        errors = [abs(b - a) / a for a, b in pairs]
        comparisons.append(
            MetricComparison(
                variant=variant,
                metric=metric,
                num_requests=len(pairs),
                real_median_s=statistics.median(real),
                sim_median_s=statistics.median(sim),
                real_mean_s=statistics.fmean(real),
                sim_mean_s=statistics.fmean(sim),
                real_p90_s=_p90(real),
                sim_p90_s=_p90(sim),
                median_rel_error=statistics.median(errors),
                p90_rel_error=_p90(errors),
                mean_rel_error=statistics.fmean(errors),
            )
        )
    return comparisons
