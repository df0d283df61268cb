"""Time-varying load: re-timed traces follow the asked rate profile and keep every request."""

from __future__ import annotations

import itertools
import math

import pytest

from raycake.sim.load_shapes import (
    DiurnalProfile,
    LoadShape,
    StepProfile,
    apply_load_shape,
    bursty_profile,
    generate_varying_trace,
    vary_rate,
)
from raycake.sim.traces import SyntheticTraceConfig, trace_from_rows


def _uniform(num_requests: int, gap_ms: int):
    """Requests every ``gap_ms``, each with its own length and hash (to check they stay put)."""
    return trace_from_rows(
        {
            "timestamp": i * gap_ms,
            "input_length": 1 + i % 700,
            "output_length": 1 + i % 13,
            "hash_ids": [i] if i % 700 < 512 else [i, -i],
        }
        for i in range(num_requests)
    )


def _counts(timestamps_ms: list[int], bin_s: float) -> list[int]:
    bins = [0] * (int(max(timestamps_ms) / 1000 // bin_s) + 1)
    for ts in timestamps_ms:
        bins[int(ts / 1000 // bin_s)] += 1
    return bins


def test_vary_rate_keeps_order_and_content_and_follows_a_diurnal_profile():
    trace = _uniform(12_000, 50)  # 20 requests/s for 600 s
    profile = DiurnalProfile(low=0.5, peak=2.0, period_s=300.0)
    varied = vary_rate(trace, profile)
    for name in ("input_length", "output_length", "hash_ids"):
        assert varied.column(name).equals(trace.column(name))
    timestamps = varied.column("timestamp_ms").to_pylist()
    assert timestamps[0] == 0
    assert all(b >= a for a, b in itertools.pairwise(timestamps))
    # The rate in each 10 s bin is 20 x the profile's mean over the bin (a full bin's count).
    counts = _counts(timestamps, 10.0)
    for k, count in enumerate(counts[:-1]):
        expected = 20 * sum(profile(10 * k + 0.1 * j + 0.05) for j in range(100)) / 100 * 10
        assert count == pytest.approx(expected, abs=2)
    # The last request (599.95 s into the original) lands where the profile's integral, in
    # closed form 1.25 T - 0.75 * 300 / (2 pi) * sin(2 pi T / 300), reaches 599.95.
    end = timestamps[-1] / 1000
    integral = 1.25 * end - 0.75 * 300 / (2 * math.pi) * math.sin(2 * math.pi * end / 300)
    assert integral == pytest.approx(599.95, abs=0.01)


def test_vary_rate_on_a_step_profile_is_exact_per_request():
    trace = _uniform(300, 100)  # 10 requests/s
    varied = vary_rate(trace, StepProfile((0.0, 10.0), (1.0, 4.0)))
    timestamps = varied.column("timestamp_ms").to_pylist()
    # As before for the first 10 s, then four times as dense.
    expected = [i * 100 if i <= 100 else 10_000 + (i - 100) * 25 for i in range(300)]
    assert max(abs(a - b) for a, b in zip(timestamps, expected, strict=True)) <= 1


def test_vary_rate_keeps_an_unsorted_trace_in_its_row_order():
    rows = [
        {"timestamp": ts, "input_length": 10, "output_length": 1, "hash_ids": [ts]}
        for ts in (3000, 1000, 2000, 1000)
    ]
    varied = vary_rate(trace_from_rows(rows), StepProfile((0.0,), (2.0,)))
    # Times measured from the first request (1000 ms) are halved; the rows keep their order.
    assert varied.column("timestamp_ms").to_pylist() == [2000, 1000, 1500, 1000]
    assert varied.column("hash_ids").to_pylist() == [[3000], [1000], [2000], [1000]]


def test_generated_diurnal_trace_has_the_asked_rate():
    config = SyntheticTraceConfig(num_requests=9000, rate_per_s=20.0, seed=5)
    shape = LoadShape(shape="diurnal", low=0.25, peak=1.0, period_s=600.0)
    trace = generate_varying_trace(config, shape)
    counts = _counts(trace.column("timestamp_ms").to_pylist(), 60.0)
    profile = shape.profile(0.0)
    for k, count in enumerate(counts[:-1]):
        mean = sum(profile(60 * k + j + 0.5) for j in range(60)) / 60
        expected = 20 * mean * 60
        # Poisson counts: within 4 standard deviations.
        assert abs(count - expected) < 4 * math.sqrt(expected)
    # Trough at the start and at the period's end, peak half-way.
    assert counts[0] < 0.5 * counts[5] and counts[9] < 0.5 * counts[5]
    assert generate_varying_trace(config, shape).equals(trace)  # seeded


def test_bursty_profile_alternates_calm_and_bursts_with_the_asked_means():
    profile = bursty_profile(
        calm=0.5, burst=3.0, mean_calm_s=100.0, mean_burst_s=20.0, horizon_s=200_000.0, seed=3
    )
    assert profile.multipliers[0] == 0.5
    assert set(profile.multipliers) == {0.5, 3.0}
    assert all(a != b for a, b in itertools.pairwise(profile.multipliers))
    lengths = [b - a for a, b in itertools.pairwise(profile.starts_s)]
    calm, burst = lengths[0::2], lengths[1::2]
    assert sum(calm) / len(calm) == pytest.approx(100.0, rel=0.1)
    assert sum(burst) / len(burst) == pytest.approx(20.0, rel=0.1)
    again = bursty_profile(
        calm=0.5, burst=3.0, mean_calm_s=100.0, mean_burst_s=20.0, horizon_s=200_000.0, seed=3
    )
    assert again == profile


def test_a_bursty_shape_covers_the_whole_trace():
    trace = _uniform(3000, 100)  # 300 s at 10/s
    shape = LoadShape(shape="bursty", low=0.5, peak=4.0, mean_calm_s=30.0, mean_burst_s=10.0)
    varied = apply_load_shape(trace, shape)
    timestamps = varied.column("timestamp_ms").to_pylist()
    assert timestamps[-1] / 1000 < 300 / 0.5  # never slower than the calm rate
    counts = _counts(timestamps, 5.0)
    assert max(counts[:-1]) >= 3 * min(counts[:-1])  # bursts and calm both show


def test_load_shape_arguments_are_validated():
    with pytest.raises(ValueError, match=r"diurnal\.low"):
        DiurnalProfile(low=0, peak=1, period_s=10)
    with pytest.raises(ValueError, match=r"diurnal\.peak"):
        DiurnalProfile(low=2, peak=1, period_s=10)
    with pytest.raises(ValueError, match=r"step_profile\.starts_s"):
        StepProfile((0.0, 5.0, 5.0), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"step_profile\.multipliers"):
        StepProfile((0.0,), (0.0,))
    with pytest.raises(ValueError, match=r"load\.shape"):
        LoadShape(shape="weekly")
    with pytest.raises(ValueError, match=r"load\.period_s"):
        LoadShape(period_s=0)
    with pytest.raises(ValueError, match=r"bursty\.mean_burst_s"):
        bursty_profile(calm=1, burst=2, mean_calm_s=1, mean_burst_s=-1, horizon_s=10, seed=0)
    trace = _uniform(10, 100)
    with pytest.raises(ValueError, match=r"vary_rate\.resolution_s"):
        vary_rate(trace, StepProfile((0.0,), (1.0,)), resolution_s=0)
    with pytest.raises(ValueError, match=r"vary_rate\.profile"):
        vary_rate(trace, lambda t: 0.0)
