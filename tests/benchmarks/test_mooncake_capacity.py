"""benchmarks/mooncake_capacity.py on a tiny generated trace: the table's shape, finite positive
gains, looser TBT SLOs never lowering a capacity, and the bisection on a known share curve."""

from __future__ import annotations

import math

import pytest

import benchmarks.mooncake_capacity as capacity_study
from raycake.sim.traces import SyntheticTraceConfig, generate_trace

REQUESTS = 80


@pytest.fixture(scope="module")
def capacity_rows():
    """Tool/agent calls over 100 16k-token contexts (few repeat in 80 requests) at 1 request/s,
    on 2 instances: 1P + 1D against 2 coupled at a 512-token budget, with and without
    admission. 32 runs, ~2 s."""
    trace = generate_trace(
        SyntheticTraceConfig(
            num_requests=REQUESTS,
            rate_per_s=1.0,
            session_share=0.0,
            agent_share=1.0,
            num_agent_contexts=100,
            agent_context_tokens=16_000,
            mean_output_tokens=100,
            seed=4,
        )
    )
    return capacity_study.run_capacity(
        {"agents": trace}, num_instances=2, steps=2, budgets=(512,), log=lambda _: None
    )


def test_one_summary_row_per_slo_and_one_detail_row_per_system(capacity_rows):
    summary, detail = capacity_rows
    assert [(r["trace"], r["tbt_slo_ms"]) for r in summary] == [
        ("agents", 100),
        ("agents", 200),
        ("agents", 300),
    ]
    assert all(list(r) == capacity_study.SUMMARY_COLUMNS for r in summary)
    systems = ["1P+1D", "2M/512", "2M/512+admit"]
    assert [r["system"] for r in detail] == systems * 3
    for row in summary:
        assert math.isfinite(row["gain"]) and row["gain"] > -1  # a positive ratio
        assert math.isfinite(row["gain_vs_default"]) and row["gain_vs_default"] > -1
        assert row["disagg_rps"] > 0 and row["coupled_rps"] > 0
        assert math.isnan(row["paper_gain"])  # the paper has numbers for its trace only
        assert row["disaggregated"] == "1P+1D" and row["coupled"] in systems[1:]
        assert 0 <= row["coupled_share_x1"] <= 1 and 0 <= row["disagg_share_x1"] <= 1


def test_a_looser_tbt_slo_never_lowers_a_capacity(capacity_rows):
    _, detail = capacity_rows
    by_slo = {(r["system"], r["tbt_slo_ms"]): r["capacity_x"] for r in detail}
    for system in ("1P+1D", "2M/512", "2M/512+admit"):
        assert by_slo[(system, 300)] >= by_slo[(system, 100)] > 0


def test_prefill_bound_work_favours_two_coupled_instances_over_one_prefill_instance(
    capacity_rows,
):
    # Long, rarely shared prompts with short outputs: the TTFT SLO binds, and 1P + 1D has half
    # the prefill GPUs. Its capacity lies between x0.5 and x1 (2 bisection steps: x2^-0.25);
    # the coupled pair passes x2 and fails x4 and both bisection points between.
    summary, detail = capacity_rows
    by_slo = {(r["system"], r["tbt_slo_ms"]): r["capacity_x"] for r in detail}
    assert by_slo[("1P+1D", 100)] == pytest.approx(2**-0.25)
    assert by_slo[("2M/512", 100)] == 2.0
    assert summary[0]["gain"] == pytest.approx(2**-0.25 / 2 - 1)  # -58%


def test_capacity_bisects_to_the_ninety_percent_line():
    # Share falls linearly from 1 at x0 to 0 at x4: 90% at x0.4.
    probes = []

    def share_at(x: float) -> float:
        probes.append(x)
        return max(0.0, 1 - x / 4)

    found = capacity_study.capacity(share_at, steps=6)
    # x1 fails, x0.5 fails, x0.25 passes; 6 geometric halvings of [0.25, 0.5] land within
    # 0.5 / 0.25 ** (1 / 64) of the line, from below.
    assert probes[:3] == [1.0, 0.5, 0.25]
    assert 0.4 * 2 ** (-1 / 64) <= found <= 0.4
    assert capacity_study.capacity(lambda x: 1.0, steps=3) == 64.0  # never fails: the cap
    assert capacity_study.capacity(lambda x: 0.0, steps=3) == 0.0  # never passes
