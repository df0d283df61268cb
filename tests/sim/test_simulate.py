"""The trace simulator against hand-computed timelines and the policies' expected behaviour."""

from __future__ import annotations

import math
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from raycake.policies.cluster_view import ClusterView, RequestView
from raycake.policies.scheduling import CacheAwareScheduler, RoundRobinScheduler
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.results import plot_latency_cdfs
from raycake.sim.roofline import RooflineCostModel, gpu_preset, model_preset
from raycake.sim.simulate import (
    SimulationConfig,
    policy_from_name,
    simulate,
    sweep,
)
from raycake.sim.traces import (
    SyntheticTraceConfig,
    generate_trace,
    prefix_reuse_ceiling,
    speed_up,
    trace_from_rows,
)

COST = StepCostModel(
    prefill_fixed_s=0.01,
    prefill_per_token_s=1e-4,
    prefill_per_token_pair_s=1e-8,
    decode_fixed_s=0.02,
    decode_per_seq_s=0.001,
    decode_per_context_token_s=1e-6,
)
BLOCK_BYTES = 512 * 1000  # 1000 bytes of KV per token
BANDWIDTH = 1e8


def _config(**overrides) -> SimulationConfig:
    values = dict(
        num_prefill=1,
        num_decode=1,
        cost_model=COST,
        kv_block_bytes=BLOCK_BYTES,
        transfer_bandwidth_bytes_per_s=BANDWIDTH,
        decode_kv_blocks=1000,
    )
    values.update(overrides)
    return SimulationConfig(**values)


def _request(ts_ms: int, n_in: int, n_out: int, hashes: list[int]) -> dict:
    return {"timestamp": ts_ms, "input_length": n_in, "output_length": n_out, "hash_ids": hashes}


def _rows(result) -> list[dict]:
    return result.requests.to_pylist()


def test_one_request_follows_the_cost_model_exactly():
    trace = trace_from_rows([_request(1000, 1000, 5, [1, 2])])
    row = _rows(simulate(trace, RoundRobinScheduler(), _config()))[0]
    transfer = 1000 * 1000 / BANDWIDTH
    ttft = COST.prefill_seconds(1000, 0) + transfer
    assert row["arrival_s"] == 1.0
    assert row["ttft_s"] == pytest.approx(ttft)
    assert row["queue_s"] == 0.0
    # 4 decode steps (the prefill made the first token), batch 1, context 1001 .. 1004.
    steps = [COST.decode_step_seconds(1, 1001 + k) for k in range(4)]
    assert row["mean_token_interval_s"] == pytest.approx(sum(steps) / 4)
    assert row["tbt_s"] == pytest.approx(max(steps))  # slowest 10% of 4 intervals: 1
    assert row["e2e_s"] == pytest.approx(ttft + sum(steps))
    assert (row["prefill_instance"], row["decode_instance"]) == ("prefill-0", "decode-0")
    assert row["predicted_ttft_s"] == pytest.approx(COST.prefill_seconds(1000, 0))


def test_a_queued_request_waits_for_the_prefill_and_the_batch_slot():
    trace = trace_from_rows([_request(0, 600, 20, [1, 2]), _request(0, 600, 3, [3, 4])])
    first, second = _rows(simulate(trace, RoundRobinScheduler(), _config(max_num_seqs=1)))
    prefill = COST.prefill_seconds(600, 0)
    transfer = 600 * 1000 / BANDWIDTH
    assert first["ttft_s"] == pytest.approx(prefill + transfer)
    assert second["queue_s"] == pytest.approx(prefill)
    assert second["ttft_s"] == pytest.approx(2 * prefill + transfer)
    first_done = prefill + transfer + sum(COST.decode_step_seconds(1, 601 + k) for k in range(19))
    assert first["e2e_s"] == pytest.approx(first_done)
    # With one batch slot the second joins only when the first has finished its 19 steps.
    steps = [COST.decode_step_seconds(1, 601), COST.decode_step_seconds(1, 602)]
    assert second["ttft_s"] < first_done
    assert second["e2e_s"] == pytest.approx(first_done + sum(steps))
    assert second["tbt_s"] == pytest.approx(first_done + steps[0] - second["ttft_s"])


def test_prefix_hits_are_counted_exactly():
    rows = [
        _request(0, 1536, 1, [1, 2, 3]),
        _request(10_000, 1536, 1, [1, 2, 4]),  # shares 2 blocks
        _request(20_000, 1536, 1, [1, 2, 3]),  # same prompt: at most (1536 - 1) // 512 = 2
        _request(30_000, 1600, 1, [1, 2, 3, 5]),  # 3 full blocks reusable
        _request(40_000, 700, 1, [9, 10]),
    ]
    result = simulate(trace_from_rows(rows), CacheAwareScheduler(), _config())
    assert [r["local_cached_tokens"] for r in _rows(result)] == [0, 1024, 1024, 1536, 0]
    assert result.summary.cache_hit_rate == pytest.approx(3584 / (4 * 1536 + 1600 - 1536 + 700))
    # One-token outputs: no decode intervals, TBT met by definition.
    assert all(math.isnan(r["tbt_s"]) and r["met_tbt_slo"] for r in _rows(result))


def test_global_store_fetch_is_timed_and_counted():
    # No local caches: the second request finds the prefix only in the store.
    rows = [_request(0, 4096, 1, list(range(8))), _request(10_000, 4096, 1, list(range(8)))]
    result = simulate(
        trace_from_rows(rows), CacheAwareScheduler(), _config(num_prefill=2, prefill_cache_blocks=0)
    )
    first, second = _rows(result)
    assert first["store_fetched_tokens"] == 0
    assert second["store_fetched_tokens"] == 7 * 512
    fetch = 7 * BLOCK_BYTES / BANDWIDTH
    transfer = 4096 * 1000 / BANDWIDTH
    assert second["ttft_s"] == pytest.approx(fetch + COST.prefill_seconds(512, 3584) + transfer)
    # Without a store there is nothing to fetch.
    no_store = simulate(
        trace_from_rows(rows),
        CacheAwareScheduler(),
        _config(num_prefill=2, prefill_cache_blocks=0, store_capacity_blocks=0),
    )
    assert [r["store_fetched_tokens"] for r in _rows(no_store)] == [0, 0]


class _Recording:
    """Wraps a policy and keeps the views it was shown."""

    name = "recording"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: list[tuple[RequestView, ClusterView]] = []

    def schedule(self, request, cluster):
        self.seen.append((request, cluster))
        return self.inner.schedule(request, cluster)


def test_the_policy_sees_the_conductors_views():
    rows = [
        _request(0, 2048, 10, [1, 2, 3, 4]),
        # Arrives while the first is still in prefill.
        _request(1, 2048, 10, [1, 2, 7, 8]),
        _request(60_000, 2048, 10, [1, 2, 3, 9]),
    ]
    policy = _Recording(RoundRobinScheduler())
    simulate(trace_from_rows(rows), policy, _config())
    (r0, _), (_, c1), (r2, c2) = policy.seen
    assert r0.store_prefix_blocks == 0 and r0.store_block_bytes == BLOCK_BYTES
    assert r0.max_tokens == 10 and r0.block_size == 512
    # The first request counts on its decode instance from the moment it is scheduled.
    assert c1.decode[0].num_running == 1
    assert c1.decode[0].total_context_tokens == 2049
    assert c1.decode[0].free_kv_blocks == 1000 - math.ceil(2058 / 512)
    assert c1.decode[0].mean_remaining_tokens == 9
    assert c1.prefill[0].num_queued == 1
    assert c1.prefill[0].queued_prefill_seconds == pytest.approx(
        COST.prefill_seconds(2048, 0) - 0.001
    )
    assert c1.prefill[0].cached_prefix_blocks == 0  # the first prefill has not finished
    # Later: both prompts' blocks are cached locally and in the store.
    assert c2.prefill[0].cached_prefix_blocks == 3
    assert r2.store_prefix_blocks == 3
    assert c2.decode[0].num_running == 0
    if hasattr(r2, "prefix_hashes"):
        assert tuple(r2.prefix_hashes) == (1, 2, 3, 9)


def _synthetic(num_requests: int = 1500, rate: float = 20.0, seed: int = 0):
    return generate_trace(
        SyntheticTraceConfig(
            num_requests=num_requests,
            rate_per_s=rate,
            session_share=0.5,
            agent_share=0.4,
            first_turn_tokens=4000,
            agent_context_tokens=8000,
            num_agent_contexts=16,
            seed=seed,
        )
    )


def _roofline_config(**overrides) -> SimulationConfig:
    roofline = RooflineCostModel(
        gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    # Small local caches (400 blocks = 204,800 tokens) so that where requests go matters.
    values = {"ttft_slo_s": 10.0, "tbt_slo_s": 0.1, "prefill_cache_blocks": 400, **overrides}
    return SimulationConfig.from_roofline(roofline, num_prefill=4, num_decode=4, **values)


def test_cache_aware_beats_random_on_shared_prefixes():
    trace = _synthetic()
    config = _roofline_config()
    random_run = simulate(trace, policy_from_name("random"), config).summary
    local = simulate(trace, policy_from_name("cache_aware_local"), config).summary
    aware = simulate(trace, policy_from_name("cache_aware"), config).summary
    assert aware.cache_hit_rate > random_run.cache_hit_rate + 0.2
    assert aware.ttft_mean_s < 0.5 * random_run.ttft_mean_s
    # The global store serves at least what instance-local caches do.
    assert aware.cache_hit_rate >= local.cache_hit_rate
    assert aware.store_hit_rate > 0 and local.store_hit_rate == 0
    for summary in (random_run, local, aware):
        assert summary.num_requests == 1500
        assert 0 < summary.prefill_utilization <= 1 and 0 < summary.decode_utilization <= 1


def test_unlimited_store_reaches_the_reuse_ceiling_at_low_load():
    trace = speed_up(_synthetic(num_requests=400), 0.05)  # requests never overlap
    summary = simulate(trace, policy_from_name("cache_aware"), _roofline_config()).summary
    assert summary.cache_hit_rate == pytest.approx(prefix_reuse_ceiling(trace), abs=1e-12)


def test_early_rejection_rejects_under_overload_only():
    light = _synthetic(num_requests=800, rate=6.0)
    heavy = speed_up(light, 20.0)
    config = _roofline_config(ttft_slo_s=5.0)
    assert simulate(light, policy_from_name("cache_aware"), config).summary.num_rejected == 0
    overloaded = simulate(heavy, policy_from_name("cache_aware"), config)
    assert overloaded.summary.num_rejected > 50
    reasons = [r["reject_reason"] for r in _rows(overloaded) if r["rejected"]]
    assert all("SLO" in reason or "capacity" in reason for reason in reasons)
    served = [r for r in _rows(overloaded) if not r["rejected"]]
    # Rejecting keeps what is admitted within the TTFT SLO far more often than admitting all.
    admit_all = simulate(
        heavy, policy_from_name("cache_aware", enable_early_rejection=False), config
    )
    assert admit_all.summary.num_rejected == 0
    assert overloaded.summary.ttft_slo_attainment > admit_all.summary.ttft_slo_attainment + 0.2
    assert len(served) == overloaded.summary.num_served
    predictive = simulate(
        heavy, policy_from_name("cache_aware", predictive_rejection=True), config
    ).summary
    assert predictive.num_rejected > 0


def test_summary_metrics_agree_with_the_rows():
    trace = _synthetic(num_requests=300, rate=20.0)
    result = simulate(trace, policy_from_name("cache_aware"), _roofline_config(ttft_slo_s=2.0))
    rows, summary = _rows(result), result.summary
    both = sum(r["met_ttft_slo"] and r["met_tbt_slo"] for r in rows if not r["rejected"])
    assert summary.effective_request_capacity == pytest.approx(both / len(rows))
    assert summary.slo_attainment == pytest.approx(both / summary.num_served)
    assert summary.goodput_rps == pytest.approx(both / summary.makespan_s)
    ttfts = sorted(r["ttft_s"] for r in rows if not r["rejected"])
    assert summary.ttft_p50_s == pytest.approx(ttfts[len(ttfts) // 2], rel=0.05)
    assert summary.requests_per_wall_s > 0


def test_parquet_and_png_are_written(tmp_path):
    trace = _synthetic(num_requests=200)
    config = _roofline_config()
    runs = {
        name: simulate(trace, policy_from_name(name), config) for name in ("random", "cache_aware")
    }
    path = runs["cache_aware"].write_parquet(tmp_path / "requests.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 200 and "tbt_s" in table.column_names
    png = plot_latency_cdfs(runs, tmp_path / "cdf.png", ttft_slo_s=10.0, tbt_slo_s=0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_covers_every_combination():
    trace = _synthetic(num_requests=200)
    result = sweep(
        trace,
        _roofline_config(),
        {
            "round_robin": lambda: policy_from_name("round_robin"),
            "cache_aware": CacheAwareScheduler,
        },
        instances=[(2, 2), (4, 4)],
        rates=[1.0, 2.0],
    )
    assert result.table.num_rows == 8
    assert set(result.table.column("policy").to_pylist()) == {"round_robin", "cache_aware"}
    assert sorted(set(result.table.column("rate").to_pylist())) == [1.0, 2.0]
    assert ("cache_aware", 2, 2, 2.0) in result.results


def test_chunked_prefill_pays_the_fixed_cost_per_chunk():
    trace = trace_from_rows([_request(0, 2048, 1, [1, 2, 3, 4])])
    row = _rows(simulate(trace, RoundRobinScheduler(), _config(prefill_chunk_tokens=512)))[0]
    transfer = 2048 * 1000 / BANDWIDTH
    chunks = sum(COST.prefill_seconds(512, 512 * k) for k in range(4))
    assert row["ttft_s"] == pytest.approx(chunks + transfer)
    assert chunks == pytest.approx(COST.prefill_seconds(2048, 0) + 3 * COST.prefill_fixed_s)


def test_a_request_larger_than_decode_memory_is_rejected():
    trace = trace_from_rows([_request(0, 5000, 10, list(range(10)))])
    result = simulate(trace, RoundRobinScheduler(), _config(decode_kv_blocks=5))
    row = _rows(result)[0]
    assert row["rejected"] and "decode capacity" in row["reject_reason"]


def test_config_is_validated():
    with pytest.raises(ValueError, match=r"simulation\.num_prefill"):
        _config(num_prefill=0)
    with pytest.raises(ValueError, match=r"simulation\.store_capacity_blocks"):
        _config(store_capacity_blocks=-1)
    with pytest.raises(ValueError, match=r"simulation\.cost_model"):
        replace(_config(), cost_model={"prefill_fixed_s": 1})
    with pytest.raises(ValueError, match=r"scheduling\.policy"):
        policy_from_name("fastest")
