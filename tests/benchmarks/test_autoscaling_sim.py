"""benchmarks/autoscaling_sim.py on a short generated diurnal load: every run is there, the
ratios are against the runs they name, and the planners pay for less than fixed-at-max."""

from __future__ import annotations

from dataclasses import replace

import pytest

import benchmarks.autoscaling_sim as bench
from raycake.sim.load_shapes import LoadShape, generate_varying_trace
from raycake.sim.results import plot_instances
from raycake.sim.traces import SyntheticTraceConfig


@pytest.fixture(scope="module")
def rows_and_runs():
    """1,500 requests, 4 -> 32 -> 4 requests/s over 2 minutes, on the study's 8 x A800 nodes
    with a 10 s start-up: every run in ~3 s."""
    trace = generate_varying_trace(
        SyntheticTraceConfig(num_requests=1500, rate_per_s=32.0, seed=1),
        LoadShape(shape="diurnal", low=0.125, peak=1.0, period_s=120.0),
    )
    config = replace(bench.cluster_config(8, 8), instance_startup_s=10.0)
    runs = bench.run_trace(trace, config)
    return bench.rows_for("diurnal", runs), runs


def test_every_run_and_its_ratios(rows_and_runs):
    rows, _ = rows_and_runs
    by_run = {row["run"]: row for row in rows}
    peak = next(label for label in by_run if label.startswith("fixed peak"))
    assert set(by_run) == {"fixed min", "fixed max", *bench.PLANNERS, peak}
    most = [max(by_run[name][f"max_{role}"] for name in bench.PLANNERS) for role in bench.ROLES]
    assert peak == f"fixed peak {most[0]}P+{most[1]}D"
    fixed_max = by_run["fixed max"]
    assert fixed_max["hours_vs_max"] == 1.0 and fixed_max["within_slo_vs_max"] == 0.0
    assert by_run[peak]["hours_vs_peak"] == 1.0
    for row in rows:
        assert row["requests"] == 1500
        assert row["hours_vs_max"] == pytest.approx(
            row["instance_hours"] / fixed_max["instance_hours"]
        )
        assert row["within_slo_vs_peak"] == pytest.approx(
            row["within_slo_share"] - by_run[peak]["within_slo_share"]
        )
    # 8P + 8D over the makespan; fixed min is 1P + 1D.
    assert fixed_max["instance_hours"] == pytest.approx(16 * fixed_max["makespan_s"] / 3600)
    assert by_run["fixed min"]["mean_prefill"] == pytest.approx(1.0)
    for name in bench.PLANNERS:
        assert by_run[name]["hours_vs_max"] < 0.7
        assert by_run[name]["within_slo_share"] > by_run["fixed min"]["within_slo_share"]


def test_the_instances_plot(rows_and_runs, tmp_path):
    _, runs = rows_and_runs
    path = plot_instances({"diurnal": runs, "again": runs}, tmp_path / "instances.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
