"""Calibrating the simulator against the real engine and the local cluster.

The fits are checked where the answer is known: the step-cost fit and the overhead fit on
synthetic measurements made from known coefficients with seeded jitter (real step times on a
shared 2-core machine are not reproducible enough to bound a fit), and a model off by 2x must
be reported ~100% off. The trace mapping and the driver-timed simulation on hand-built inputs;
the real engine's step measurement by the shapes it timed; the whole loop on a tiny replay
through the real Ray cluster, by its prefix hits and the arithmetic of its report.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import fields, replace

import pyarrow as pa
import pytest

from raycake.cluster.config import ClusterConfig
from raycake.engine.config import EngineConfig
from raycake.policies.scheduling import scheduling_policy_from_config
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.policies.step_cost_model import DecodeSample, PrefillSample, StepCostModel
from raycake.sim.calibration.calibrate import (
    calibrate_simulator,
    calibration_trace,
)
from raycake.sim.calibration.driver_timed import simulate_as_driver
from raycake.sim.calibration.overheads import CalibratedStepTimer, ClusterOverheads, fit_overheads
from raycake.sim.calibration.replay import (
    ReplayedRequest,
    compare_metrics,
    paired_requests,
    prompt_tokens_for,
    slowest_share_tbt,
    trace_in_engine_blocks,
)
from raycake.sim.calibration.steps import (
    StepPlan,
    measure_engine_steps_like_instances,
    relative_errors,
)
from raycake.sim.config import SimulationConfig
from raycake.sim.simulate import simulate
from raycake.sim.traces import TRACE_SCHEMA
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

MODEL = StepCostModel(
    prefill_fixed_s=0.003,
    prefill_per_token_s=8e-5,
    prefill_per_token_pair_s=7e-8,
    decode_fixed_s=0.003,
    decode_per_seq_s=2e-4,
    decode_per_context_token_s=6e-7,
)


def _config(timer: CalibratedStepTimer) -> SimulationConfig:
    return SimulationConfig(
        num_prefill=1,
        num_decode=1,
        cost_model=MODEL,
        kv_block_bytes=65536,
        transfer_bandwidth_bytes_per_s=4e8,
        decode_kv_blocks=8192,
        prefill_cache_blocks=8192,
        store_capacity_blocks=8192,
        max_num_seqs=64,
        block_size=16,
        step_timer=timer,
    )


def _policy():
    return scheduling_policy_from_config(SchedulingConfig())


def _synthetic_steps(
    model: StepCostModel,
    new_tokens: tuple[int, ...],
    cached_tokens: tuple[int, ...],
    batch_sizes: tuple[int, ...],
    context_per_seq: tuple[int, ...],
    noise: float,
    seed: int,
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Step times ``model`` gives each shape, times a seeded Gaussian factor 1 +- ``noise``:
    measurements whose true coefficients are known (real step times on a shared machine are
    not reproducible enough to test a fit against)."""
    rng = random.Random(seed)
    prefill = [
        PrefillSample(n, c, model.prefill_seconds(n, c) * (1 + rng.gauss(0, noise)))
        for n in new_tokens
        for c in cached_tokens
    ]
    decode = [
        DecodeSample(b, b * t, model.decode_step_seconds(b, b * t) * (1 + rng.gauss(0, noise)))
        for b in batch_sizes
        for t in context_per_seq
    ]
    return prefill, decode


def _scaled(model: StepCostModel, factor: float) -> StepCostModel:
    return StepCostModel(**{f.name: factor * getattr(model, f.name) for f in fields(model)})


# StepPlan's default grid (what calibration measures) and a held-out grid between its points.
SEEN = ((16, 64, 192, 512, 1024), (0, 256, 768), (1, 4, 8, 16), (32, 384))
HELD_OUT = ((48, 300, 700), (128, 512), (2, 12), (100, 300))


def test_step_fit_recovers_the_coefficients_the_steps_were_made_with():
    # Exact data: every coefficient back to rounding.
    fitted = StepCostModel.fit(*_synthetic_steps(MODEL, *SEEN, noise=0.0, seed=0))
    for f in fields(MODEL):
        assert getattr(fitted, f.name) == pytest.approx(getattr(MODEL, f.name), rel=1e-6), f.name
    # 2% timing noise (seeded): coefficients within 10% (7% seen), and predictions of shapes
    # it did not see within 3% of the true step times (1.1% seen).
    fitted = StepCostModel.fit(*_synthetic_steps(MODEL, *SEEN, noise=0.02, seed=0))
    for f in fields(MODEL):
        assert getattr(fitted, f.name) == pytest.approx(getattr(MODEL, f.name), rel=0.1), f.name
    truth_prefill, truth_decode = _synthetic_steps(MODEL, *HELD_OUT, noise=0.0, seed=0)
    assert max(relative_errors(fitted, truth_prefill, truth_decode)) < 0.03
    # Against noisy held-out measurements the median error is the noise's (1.5% seen).
    held_prefill, held_decode = _synthetic_steps(MODEL, *HELD_OUT, noise=0.02, seed=1)
    assert statistics.median(relative_errors(fitted, held_prefill, held_decode)) < 0.03
    # A model off by 2x (or by half) is reported as 100% (50%) off, not hidden by the noise.
    doubled = statistics.median(relative_errors(_scaled(MODEL, 2.0), held_prefill, held_decode))
    halved = statistics.median(relative_errors(_scaled(MODEL, 0.5), held_prefill, held_decode))
    assert doubled == pytest.approx(1.0, abs=0.05)
    assert halved == pytest.approx(0.5, abs=0.025)
    assert relative_errors(_scaled(MODEL, 2.0), truth_prefill, truth_decode) == pytest.approx(
        [1.0] * len(truth_prefill + truth_decode)
    )


def test_engine_step_measurement_times_the_planned_shapes():
    """The real engine's steps are timed at exactly the planned shapes (the counts are
    deterministic; the seconds are not, so they are only checked for the obvious ordering)."""
    plan = StepPlan(
        prefill_new_tokens=(16, 96, 384),
        prefill_cached_tokens=(0, 256),
        decode_batch_sizes=(1, 8),
        decode_context_tokens=(32, 256),
        decode_steps=4,
        repeats=1,
    )
    measured = measure_engine_steps_like_instances(EngineConfig(), plan)
    assert measured.torch_threads == 1 and measured.notes == []
    assert sorted((s.num_new_tokens, s.num_cached_tokens) for s in measured.prefill) == [
        (n, c) for n in (16, 96, 384) for c in (0, 256)
    ]
    # decode_steps steps per shape, after the prefill's token: context c + 1 .. c + 4 each.
    assert sorted((s.batch_size, s.total_context_tokens) for s in measured.decode) == [
        (b, b * (c + j)) for b in (1, 8) for c in (32, 256) for j in range(1, 5)
    ]
    model = measured.fit()
    assert model.prefill_seconds(384, 0) > 2 * model.prefill_seconds(16, 0) > 0


def test_trace_blocks_map_onto_engine_blocks_keeping_shared_prefixes():
    trace = pa.Table.from_pylist(
        [
            {"timestamp_ms": 0, "input_length": 1024, "output_length": 4, "hash_ids": [7, 8]},
            {"timestamp_ms": 5, "input_length": 1100, "output_length": 4, "hash_ids": [7, 8, 9]},
        ],
        schema=TRACE_SCHEMA,
    )
    mapped = trace_in_engine_blocks(trace, block_size=16, max_model_len=2048)
    # ceil(n * 16 / 512): the block count is kept exactly.
    assert mapped.column("input_length").to_pylist() == [32, 35]
    first, second = (
        prompt_tokens_for(h, n, 16, 4096)
        for h, n in zip(
            mapped.column("hash_ids").to_pylist(),
            mapped.column("input_length").to_pylist(),
            strict=True,
        )
    )
    assert len(first) == 32 and len(second) == 35
    assert first == second[:32] and second[32:] != first[:3]
    with pytest.raises(ValueError, match="max_model_len"):
        trace_in_engine_blocks(trace, block_size=16, max_model_len=30)
    with pytest.raises(ValueError, match="hash_ids"):
        prompt_tokens_for([1], 40, 16, 4096)
    assert slowest_share_tbt([0.1] * 19 + [0.5]) == pytest.approx(0.3)  # slowest 2 of 20


def test_driver_timing_moves_the_transfer_and_the_hand_off_into_the_first_interval():
    trace = trace_in_engine_blocks(calibration_trace(20, 4.0), 16, 2048)
    timer = CalibratedStepTimer(engine=MODEL, max_prefill_chunk=512)
    config = _config(timer)
    plain = simulate(trace, _policy(), config).requests.to_pydict()
    driver = simulate_as_driver(trace, _policy(), config).requests.to_pydict()
    handed = simulate_as_driver(trace, _policy(), config, handoff_s=0.05).requests.to_pydict()
    per_token = config.kv_block_bytes / config.block_size / config.transfer_bandwidth_bytes_per_s
    for i, n in enumerate(plain["num_prompt_tokens"]):
        assert driver["ttft_s"][i] == pytest.approx(plain["ttft_s"][i] - n * per_token)
        assert handed["ttft_s"][i] == pytest.approx(driver["ttft_s"][i])
        if plain["num_output_tokens"][i] > 1:
            # The first interval now holds transfer (+ hand-off): TBT and mean interval grow.
            assert driver["tbt_s"][i] >= plain["tbt_s"][i] - 1e-12
            assert handed["tbt_s"][i] > driver["tbt_s"][i]


def test_overhead_fit_recovers_the_overheads_a_replay_was_made_with():
    """A replay made by the simulator with known overheads, its timings jittered by a seeded
    +-3%: the fit finds the overheads it was made with, the twin it gives predicts the replay
    within the jitter, and a twin whose steps all take twice as long is reported ~100% off."""
    trace = trace_in_engine_blocks(calibration_trace(30, 5.0, seed=3), 16, 2048)
    truth = ClusterOverheads(
        prefill_fixed_s=0.02,
        prefill_compute_scale=2.0,
        decode_step_s=0.004,
        decode_compute_scale=1.5,
    )
    engine_timer = CalibratedStepTimer(engine=MODEL, max_prefill_chunk=512)
    config = _config(engine_timer)
    made = simulate_as_driver(
        trace,
        _policy(),
        _config(CalibratedStepTimer(engine=MODEL, max_prefill_chunk=512, overheads=truth)),
    ).requests.to_pydict()
    rng = random.Random(0)

    def jitter() -> float:
        return 1 + rng.uniform(-0.03, 0.03)

    replayed = []
    for i in range(trace.num_rows):
        mean = made["mean_token_interval_s"][i]
        # Even intervals (no hand-off beyond a step, no spread) but for the jitter.
        intervals = (
            ()
            if math.isnan(mean)
            else tuple(mean * jitter() for _ in range(made["num_output_tokens"][i] - 1))
        )
        replayed.append(
            ReplayedRequest(
                index=i,
                arrival_s=made["arrival_s"][i],
                start_lag_s=0.0,
                num_prompt_tokens=made["num_prompt_tokens"][i],
                num_output_tokens=made["num_output_tokens"][i],
                num_cached_tokens=made["local_cached_tokens"][i],
                finish_reason="length",
                ttft_s=made["ttft_s"][i] * jitter(),
                tbt_s=made["tbt_s"][i],
                mean_token_interval_s=statistics.fmean(intervals) if intervals else mean,
                token_intervals_s=intervals,
            )
        )
    fitted = fit_overheads(replayed, trace, config, engine_timer, _policy)
    assert fitted.handoff_s == 0.0
    assert all(0.97 / 1.03 <= r <= 1.03 / 0.97 for r in fitted.decode_interval_ratios)
    assert (fitted.prefill_fixed_s, fitted.prefill_compute_scale) == (0.02, 2.0)
    assert (fitted.decode_step_s, fitted.decode_compute_scale) == (0.004, 1.5)

    def errors(timer: CalibratedStepTimer, bandwidth: float) -> dict[str, float]:
        sim_config = replace(config, step_timer=timer, transfer_bandwidth_bytes_per_s=bandwidth)
        result = simulate_as_driver(trace, _policy(), sim_config, timer.overheads.handoff_s)
        paired = paired_requests(replayed, result.requests)
        return {c.metric: c.median_rel_error for c in compare_metrics(paired, "twin")}

    bandwidth = config.transfer_bandwidth_bytes_per_s
    twin = errors(
        replace(engine_timer, overheads=replace(fitted, decode_interval_ratios=())), bandwidth
    )
    assert twin["ttft"] < 0.03 and twin["mean_token_interval"] < 0.03, twin  # 1.7%, 0.2% seen
    slow = CalibratedStepTimer(
        engine=_scaled(MODEL, 2.0),
        max_prefill_chunk=512,
        overheads=replace(truth, prefill_fixed_s=0.04, decode_step_s=0.008),
    )
    doubled = errors(slow, bandwidth / 2)
    # Every step and transfer twice as long: 100% off, a little more where queues grow (106%,
    # 105% seen).
    for metric in ("ttft", "mean_token_interval"):
        assert 0.9 < doubled[metric] < 1.3, doubled
    with pytest.raises(ValueError, match="fit_indices"):
        fit_overheads(replayed, trace, config, engine_timer, _policy, fit_indices=[99])


def test_metric_comparison_reports_relative_errors_per_request():
    """compare_metrics on hand-built pairs: |sim - real| / real per request, then the median."""
    real = [0.1, 0.2, 0.4, 0.8, 1.6]
    replayed = [
        ReplayedRequest(
            index=i,
            arrival_s=float(i),
            start_lag_s=0.0,
            num_prompt_tokens=32,
            num_output_tokens=4,
            num_cached_tokens=0,
            finish_reason="length",
            ttft_s=x,
            tbt_s=x / 10,
            mean_token_interval_s=x / 20,
            token_intervals_s=(x / 20,) * 3,
        )
        for i, x in enumerate(real)
    ]
    factors = [2.0, 2.0, 0.5, 1.1, 2.0]  # per request: 100%, 100%, 50%, 10%, 100% off
    simulated = pa.table(
        {
            "rejected": [False] * 5,
            "local_cached_tokens": [0] * 5,
            "store_fetched_tokens": [0] * 5,
            "ttft_s": [x * f for x, f in zip(real, factors, strict=True)],
            "tbt_s": [x / 10 for x in real],
            "mean_token_interval_s": [x / 20 * 2 for x in real],
        }
    )
    by_metric = {c.metric: c for c in compare_metrics(paired_requests(replayed, simulated), "hand")}
    ttft = by_metric["ttft"]
    assert ttft.num_requests == 5
    assert ttft.median_rel_error == pytest.approx(1.0)
    assert ttft.mean_rel_error == pytest.approx((1 + 1 + 0.5 + 0.1 + 1) / 5)
    assert (ttft.real_median_s, ttft.sim_median_s) == pytest.approx((0.4, 0.4))
    assert by_metric["tbt"].median_rel_error == 0.0
    assert by_metric["mean_token_interval"].median_rel_error == pytest.approx(1.0)


def test_overheads_and_timer_validate_fields():
    with pytest.raises(ValueError, match=r"overheads\.prefill_fixed_s"):
        ClusterOverheads(prefill_fixed_s=-1.0)
    with pytest.raises(ValueError, match=r"timer\.max_prefill_chunk"):
        CalibratedStepTimer(engine=MODEL, max_prefill_chunk=0)
    with pytest.raises(ValueError, match=r"step_plan\.repeats"):
        StepPlan(repeats=0)


def test_tiny_replay_on_the_cluster_compares_with_the_simulation(ray_session):  # noqa: F811
    from raycake.cluster.cluster import Cluster

    cluster = Cluster(ClusterConfig(namespace="raycake-test-calibrate"))
    try:
        report = calibrate_simulator(
            cluster,
            calibration_trace(8, 4.0, seed=1),
            num_folds=2,
            repeat_replay=False,
            step_plan=StepPlan(
                prefill_new_tokens=(16, 128, 384),
                prefill_cached_tokens=(0, 256),
                decode_batch_sizes=(1, 6),
                decode_context_tokens=(32, 256),
                decode_steps=3,
                repeats=1,
            ),
        )
    finally:
        cluster.shutdown()
    assert report.sim_config.block_size == cluster.block_size == 16
    data = report.requests.to_pydict()
    assert data["real_finish_reason"] == ["length"] * 8
    # The same prefix hits, and there are some (a trace without any would make this vacuous).
    assert data["real_cached_tokens"] == data["sim_cached_tokens"]
    assert sum(data["real_cached_tokens"]) > 0
    # The reported comparisons are the per-request relative errors of the table's own columns
    # (timings on a shared machine are not reproducible: the arithmetic is checked, not them).
    for metric, column in (("ttft", "ttft_s"), ("tbt", "tbt_s")):
        for variant, sim_column in (
            ("calibrated", f"sim_{column}"),
            ("engine_only", f"engine_only_sim_{column}"),
        ):
            pairs = [
                (real, sim)
                for real, sim in zip(data[f"real_{column}"], data[sim_column], strict=True)
                if math.isfinite(real) and math.isfinite(sim) and real > 0
            ]
            c = report.comparison(metric, variant)
            assert c.num_requests == len(pairs) >= 1
            assert c.real_median_s == statistics.median(a for a, _ in pairs)
            assert c.sim_median_s == statistics.median(b for _, b in pairs)
            assert c.median_rel_error == pytest.approx(
                statistics.median(abs(b - a) / a for a, b in pairs)
            )
    # Engine steps alone leave the cluster's overheads out (every fitted scale >= 1, fixed
    # seconds >= 0): they predict a shorter TTFT.
    assert (
        report.comparison("ttft", "engine_only").sim_median_s
        <= report.comparison("ttft").sim_median_s
    )
