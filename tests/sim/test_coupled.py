"""The coupled (vLLM-style) simulator against hand-computed timelines, and beside the
disaggregated one on the same requests.

Costs (as test_simulate.py): prefill 0.01 + 1e-4 * new + 1e-8 * new * (cached + new / 2) s,
decode steps 0.02 + 0.001 * batch + 1e-6 * context s. With this fitted model as the timer a
mixed step is its chunks' prefill times plus the decode step time.
"""

from __future__ import annotations

import math

import pytest

from raycake.policies.admission_control import AdmissionControl
from raycake.policies.scheduling import RoundRobinScheduler
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.coupled import CoupledConfig, simulate_coupled
from raycake.sim.results import REQUEST_SCHEMA
from raycake.sim.roofline import RooflineCostModel, gpu_preset, model_preset
from raycake.sim.simulate import SimulationConfig, policy_from_name, simulate
from raycake.sim.traces import SyntheticTraceConfig, generate_trace, trace_from_rows

COST = StepCostModel(
    prefill_fixed_s=0.01,
    prefill_per_token_s=1e-4,
    prefill_per_token_pair_s=1e-8,
    decode_fixed_s=0.02,
    decode_per_seq_s=0.001,
    decode_per_context_token_s=1e-6,
)


def _config(**overrides) -> CoupledConfig:
    values = dict(
        num_instances=1,
        cost_model=COST,
        kv_blocks=1000,
        max_num_seqs=4,
        max_num_batched_tokens=1024,
    )
    return CoupledConfig(**{**values, **overrides})


def _request(ts_ms: int, n_in: int, n_out: int, hashes: list[int]) -> dict:
    return {"timestamp": ts_ms, "input_length": n_in, "output_length": n_out, "hash_ids": hashes}


def _blocks(start: int, n_in: int) -> list[int]:
    return list(range(start, start + -(-n_in // 512)))


def _rows(trace_rows, config=None, policy=None) -> list[dict]:
    result = simulate_coupled(
        trace_from_rows(trace_rows), policy or RoundRobinScheduler(), config or _config()
    )
    assert result.requests.schema == REQUEST_SCHEMA  # the disaggregated simulator's columns
    return result.requests.to_pylist()


def test_one_request_is_the_sum_of_its_chunk_steps():
    (row,) = _rows([_request(1000, 2600, 5, _blocks(0, 2600))])
    # 2600 prompt tokens in chunks of the 1024-token budget: 1024 + 1024 + 552.
    chunks = [COST.prefill_seconds(1024, 0), COST.prefill_seconds(1024, 1024)]
    chunks.append(COST.prefill_seconds(552, 2048))
    assert chunks == pytest.approx([0.11764288, 0.12812864, 0.07802848])
    assert row["ttft_s"] == pytest.approx(sum(chunks))
    assert row["queue_s"] == 0.0 and row["arrival_s"] == 1.0
    # Then 4 decode steps over contexts 2601 .. 2604; the slowest 10% of 4 intervals is 1.
    steps = [COST.decode_step_seconds(1, 2601 + k) for k in range(4)]
    assert row["tbt_s"] == pytest.approx(max(steps)) == pytest.approx(0.023604)
    assert row["mean_token_interval_s"] == pytest.approx(sum(steps) / 4)
    assert row["e2e_s"] == pytest.approx(sum(chunks) + sum(steps))
    assert row["prefill_instance"] == row["decode_instance"] == "coupled-0"
    assert row["predicted_ttft_s"] == pytest.approx(COST.prefill_seconds(2600, 0))


# A decodes 20 tokens; B's 8,000-token prompt (one output token) arrives while A decodes.
SHORT = _request(0, 600, 20, _blocks(0, 600))
LONG = _request(300, 8000, 1, _blocks(100, 8000))


def test_a_long_prefill_chunked_into_the_decode_steps_stretches_the_tbt():
    alone, with_long = _rows([SHORT])[0], _rows([SHORT, LONG])[0]
    # Alone: 19 decode steps of step(1, 601 + k); the slowest 2 (10% of 19, rounded up).
    steps = [COST.decode_step_seconds(1, 601 + k) for k in range(19)]
    assert alone["tbt_s"] == pytest.approx((steps[-1] + steps[-2]) / 2)
    # With B: A's first token at 0.0802 s; B arrives at 0.3 s, during A's 11th decode step
    # (the steps take ~0.0216 s), and joins the 12th (context 612): from then on each step
    # carries a 1,023-token chunk of B beside A's token (the budget less A's one), and A's two
    # slowest intervals are the chunks after 6,138 and 5,115 cached tokens.
    first_token = COST.prefill_seconds(600, 0)
    assert with_long["ttft_s"] == pytest.approx(first_token)
    chunk_steps = sorted(
        COST.prefill_seconds(1023, 1023 * k) + COST.decode_step_seconds(1, 612 + k)
        for k in range(7)
    )
    assert with_long["tbt_s"] == pytest.approx((chunk_steps[-1] + chunk_steps[-2]) / 2)
    assert with_long["tbt_s"] > 7 * alone["tbt_s"]


def test_disaggregated_decode_is_not_interfered_with():
    config = SimulationConfig(
        num_prefill=1,
        num_decode=1,
        cost_model=COST,
        kv_block_bytes=512 * 1000,
        transfer_bandwidth_bytes_per_s=1e8,
        decode_kv_blocks=1000,
    )
    runs = [trace_from_rows(rows) for rows in ([SHORT], [SHORT, LONG])]
    alone, with_long = (
        simulate(trace, RoundRobinScheduler(), config).requests.to_pylist()[0] for trace in runs
    )
    # B's prefill runs on the prefill instance: A's decode steps are the same as alone.
    assert with_long["tbt_s"] == alone["tbt_s"]
    assert with_long["e2e_s"] == alone["e2e_s"]


def test_kv_capacity_is_respected():
    # 10 blocks per instance; each request needs ceil((1500 + 100) / 512) = 4.
    rows = _rows(
        [_request(0, 1500, 100, _blocks(10 * i, 1500)) for i in range(3)]
        + [_request(0, 5000, 200, _blocks(100, 5000))],  # 11 blocks: can never fit
        _config(kv_blocks=10, max_num_batched_tokens=4096),
    )
    first, second, third, huge = rows
    assert huge["rejected"] and huge["reject_reason"] == (
        "decode capacity: 11 KV blocks needed > 10 per coupled instance"
    )
    # Two fit (8 blocks) and share the first step's 4,096-token budget; the third waits for
    # one of them to finish and free its 4 blocks.
    assert first["queue_s"] == second["queue_s"] == 0.0
    assert third["queue_s"] == pytest.approx(min(first["e2e_s"], second["e2e_s"]))
    assert not any(r["rejected"] for r in (first, second, third))


def test_prefix_cache_hits_shorten_the_prefill():
    shared = _blocks(0, 3000)  # 6 ids; the second prompt shares the first 5 blocks
    trace = [_request(0, 3000, 2, shared), _request(10_000, 3000, 2, [*shared[:5], 99])]
    first, second = _rows(trace)
    assert (first["local_cached_tokens"], second["local_cached_tokens"]) == (0, 2560)
    assert second["ttft_s"] == pytest.approx(COST.prefill_seconds(440, 2560))
    # Without prefix caching it computes all 3,000 tokens again, in 3 chunks.
    _, uncached = _rows(trace, _config(prefix_caching=False))
    assert uncached["local_cached_tokens"] == 0
    assert uncached["ttft_s"] == pytest.approx(
        sum(COST.prefill_seconds(n, c) for n, c in ((1024, 0), (1024, 1024), (952, 2048)))
    )


def _roofline_config(**overrides) -> CoupledConfig:
    roofline = RooflineCostModel(
        gpu=gpu_preset("a800"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    values = {"num_instances": 2, "ttft_slo_s": 10.0, "tbt_slo_s": 0.5, **overrides}
    return CoupledConfig.from_roofline(roofline, **values)


def _chat(rate_per_s: float):
    return generate_trace(
        SyntheticTraceConfig(
            num_requests=300, rate_per_s=rate_per_s, first_turn_tokens=4000, seed=3
        )
    )


def test_every_request_finishes_or_is_rejected_under_overload():
    trace = _chat(30.0)  # 2 instances' prefill saturates: TTFT, not TBT, fails
    for name in ("sglang_cache_aware", "least_loaded"):
        summary = simulate_coupled(trace, policy_from_name(name), _roofline_config()).summary
        assert summary.num_requests == summary.num_served == 300  # no admission: none rejected
        assert summary.ttft_slo_attainment < 0.5
        assert 0 < summary.prefill_utilization <= 1 and 0 < summary.decode_utilization <= 1
    admitted = simulate_coupled(
        trace, AdmissionControl(policy_from_name("sglang_cache_aware")), _roofline_config()
    )
    rows = admitted.requests.to_pylist()
    rejected = [r for r in rows if r["rejected"]]
    assert len(rows) == 300 and 0 < len(rejected) < 300
    assert all(r["reject_reason"].startswith("TTFT SLO") for r in rejected)
    assert admitted.summary.ttft_slo_attainment == 1.0
    assert admitted.summary.effective_request_capacity > summary.effective_request_capacity
    assert all(r["decode_instance"] == r["prefill_instance"] for r in rows if not r["rejected"])


def test_the_admission_rules_tbt_estimate_cannot_see_prefill_interference():
    # At 8 requests/s TTFT is met, but 2,048-token chunks stretch the steps to ~0.27 s: 96% of
    # requests miss a 100 ms TBT, while the rule predicts decode steps alone and admits all.
    config = _roofline_config(tbt_slo_s=0.1)
    admitted = simulate_coupled(
        _chat(8.0), AdmissionControl(policy_from_name("sglang_cache_aware")), config
    ).summary
    assert admitted.num_rejected == 0
    assert admitted.tbt_slo_attainment < 0.1 and admitted.ttft_slo_attainment == 1.0


def test_roofline_mixed_step_is_one_pass():
    roofline = RooflineCostModel(
        gpu=gpu_preset("a800"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    assert roofline.mixed_step_seconds([(2048, 4096)], 0, 0) == roofline.prefill_seconds(2048, 4096)
    assert roofline.mixed_step_seconds([], 32, 512_000) == roofline.decode_step_seconds(32, 512_000)
    mixed = roofline.mixed_step_seconds([(2016, 4096)], 32, 512_000)
    decode = roofline.decode_step_seconds(32, 512_000)
    parts = roofline.prefill_seconds(2016, 4096) + decode
    # The decode batch rides along the compute-bound chunk: the weights are read once and the
    # step overhead paid once, so over 80% of the decode step's time is saved.
    assert roofline.prefill_seconds(2016, 4096) < mixed < parts - 0.8 * decode
    # A 2,016-token chunk makes a 70B decode step 10x slower on 8 x A800 (0.2745 vs 0.0275 s).
    assert (mixed, decode) == pytest.approx((0.2744925, 0.0274754), rel=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match=r"coupled\.num_instances: expected an integer >= 1"):
        _config(num_instances=0)
    with pytest.raises(ValueError, match=r"coupled\.max_num_batched_tokens: expected an integer"):
        _config(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match=r"coupled\.tbt_slo_s"):
        _config(tbt_slo_s=math.inf)
    with pytest.raises(ValueError, match=r"policy: expected a SchedulingPolicy"):
        simulate_coupled(trace_from_rows([SHORT]), object(), _config())  # type: ignore[arg-type]
