"""The planners in the simulator: instances added after the cool-down and the start-up delay,
drained without losing a request, paid instance time as the integral of the timeline."""

from __future__ import annotations

import itertools
import math

import pytest

from raycake.policies.planner import PlannerConfig, PlannerDecision, PlannerView
from raycake.policies.scheduling import LeastLoadedScheduler
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.autoscaling import instance_seconds
from raycake.sim.event_loop import SimulatedCluster
from raycake.sim.results import plot_instances
from raycake.sim.simulate import SimulationConfig, policy_from_name, simulate
from raycake.sim.traces import SyntheticTraceConfig, generate_trace, trace_from_rows

# A prompt of 1000 new tokens prefills in 0.11 s: one prefill instance serves ~9 requests/s.
COST = StepCostModel(
    prefill_fixed_s=0.01,
    prefill_per_token_s=1e-4,
    prefill_per_token_pair_s=0.0,
    decode_fixed_s=0.02,
    decode_per_seq_s=0.0005,
    decode_per_context_token_s=0.0,
)
TTFT_SLO_S = 2.0


def _config(**overrides) -> SimulationConfig:
    values = dict(
        num_prefill=1,
        num_decode=1,
        cost_model=COST,
        kv_block_bytes=512 * 1000,
        transfer_bandwidth_bytes_per_s=1e10,
        decode_kv_blocks=100_000,
        max_num_seqs=256,
        ttft_slo_s=TTFT_SLO_S,
        tbt_slo_s=0.5,
        planner_interval_s=1.0,
        instance_startup_s=5.0,
    )
    values.update(overrides)
    return SimulationConfig(**values)


def _steady(phases: list[tuple[float, float]], n_in: int = 1000, n_out: int = 4):
    """Evenly spaced requests: (seconds, requests/s) per phase, unique prompts (no reuse)."""
    rows, start_ms, next_id = [], 0.0, 0
    for seconds, rate in phases:
        gap_ms = 1000.0 / rate
        for k in range(round(seconds * rate)):
            blocks = -(-n_in // 512)
            rows.append(
                {
                    "timestamp": round(start_ms + k * gap_ms),
                    "input_length": n_in,
                    "output_length": n_out,
                    "hash_ids": list(range(next_id, next_id + blocks)),
                }
            )
            next_id += blocks
        start_ms += seconds * 1000
    return trace_from_rows(rows)


SLO_PLANNER = PlannerConfig(name="slo", max_prefill=6, cooldown_s=10.0, down_stable_s=20.0)
# 2/s for 30 s, 20/s for 60 s (about 2.2 instances' worth), then 2/s for 120 s.
STEP_PHASES = [(30.0, 2.0), (60.0, 20.0), (120.0, 2.0)]


def _run_cluster(trace, config, policy=None) -> tuple[SimulatedCluster, object]:
    cluster = SimulatedCluster(trace, policy or LeastLoadedScheduler(), config)
    return cluster, cluster.run()


def test_a_load_step_scales_prefill_up_after_startup_and_back_down_to_min():
    config = _config(planner=SLO_PLANNER)
    cluster, result = _run_cluster(_steady(STEP_PHASES), config)
    timeline = result.timeline.to_pylist()
    changes = cluster.autoscaler.changes

    # The first instance starts at the first tick whose predicted TTFT (queued prefill seconds
    # + a typical prefill) passes 0.8 x SLO: the queue grows at 20 x 0.11 - 1 = 1.2 s per
    # second from t = 30 s, so about 1.2 s later; it takes work 5 s after that.
    starts = [t for t, what, iid in changes if what == "start" and iid.startswith("prefill")]
    first_up = starts[0]
    assert 31.0 <= first_up <= 34.0
    readies = {iid: t for t, what, iid in changes if what == "ready"}
    started = {iid: t for t, what, iid in changes if what == "start"}
    assert all(readies[iid] == pytest.approx(t + 5.0) for iid, t in started.items())
    row = next(r for r in timeline if r["time_s"] == first_up)
    assert row["num_prefill"] > 1 and row["num_prefill_ready"] == 1  # paid, not yet working
    # The next change of the role waits for the 10 s cool-down.
    later = [t for t in starts if t > first_up]
    assert not later or later[0] >= first_up + 10.0
    peak = max(r["num_prefill"] for r in timeline)
    assert 3 <= peak <= 6

    # Attainment recovers: requests arriving in the step's last 30 s (instances long ready)
    # meet the TTFT SLO, unlike those just after the step.
    rows = result.requests.to_pylist()

    def met(start_s: float, end_s: float) -> float:
        window = [r for r in rows if start_s <= r["arrival_s"] < end_s]
        return sum(r["met_ttft_slo"] for r in window) / len(window)

    assert met(60.0, 90.0) == 1.0
    assert met(30.0, first_up + 5.0) < met(60.0, 90.0)

    # Idle again: back to the minimum, one instance at a time, each after down_stable_s.
    drains = [t for t, what, iid in changes if what == "drain" and iid.startswith("prefill")]
    assert len(drains) == peak - 1
    assert all(b - a >= 20.0 for a, b in itertools.pairwise(drains))
    assert timeline[-1]["num_prefill"] == timeline[-1]["num_prefill_ready"] == 1
    assert timeline[-1]["num_decode"] == 1


def test_draining_loses_no_request_and_never_reuses_an_id():
    trace = _steady(STEP_PHASES)
    config = _config(planner=SLO_PLANNER, instance_startup_s=2.0)
    cluster, result = _run_cluster(trace, config)
    rows = result.requests.to_pylist()
    # Every trace line exactly once, finished or rejected (and run() checked the invariants).
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(trace.num_rows)]
    assert result.summary.num_served + result.summary.num_rejected == trace.num_rows
    ids = [p.instance_id for p in cluster.every_prefill]
    assert len(set(ids)) == len(ids) > 1
    # A drained instance takes no new request and goes only once its last one has left it.
    changes = cluster.autoscaler.changes
    drained = [(t, iid) for t, what, iid in changes if what == "drain"]
    assert drained
    for drained_s, iid in drained:
        retired_s = next(t for t, w, i in changes if w == "retire" and i == iid)
        served = [r for r in rows if r["prefill_instance"] == iid]
        assert all(r["arrival_s"] < drained_s for r in served)
        assert retired_s >= max((r["arrival_s"] + r["ttft_s"] for r in served), default=0.0)
        assert retired_s - drained_s < 1.0 + 1e-9  # found idle at the next tick or this one


def test_every_planner_serves_every_request_under_a_burst():
    trace = _steady(STEP_PHASES)
    for name in ("dynamo", "llmd", "fixed"):
        planner = PlannerConfig(name=name, max_prefill=6, cooldown_s=5.0)
        result = simulate(trace, policy_from_name("cache_aware"), _config(planner=planner))
        assert result.requests.num_rows == trace.num_rows
        counts = result.timeline.column("num_prefill").to_pylist()
        assert (max(counts) > 1) == (name != "fixed")


class _Scripted:
    """A planner that asks for given prefill counts from given times."""

    name = "scripted"

    def __init__(self, plan: list[tuple[float, int]]) -> None:
        self.plan_from = plan

    def plan(self, view: PlannerView) -> PlannerDecision:
        target = view.num_prefill
        for from_s, count in self.plan_from:
            if view.now_s >= from_s:
                target = count
        return PlannerDecision(target, view.num_decode, f"scripted {target}")


def test_instance_seconds_are_the_integral_of_the_timeline():
    trace = _steady([(60.0, 1.0)])  # a request a second; each is done well within a second
    config = _config(planner=PlannerConfig(name="fixed"), planner_interval_s=5.0)
    cluster = SimulatedCluster(trace, LeastLoadedScheduler(), config)
    cluster.autoscaler.planner = _Scripted([(10.0, 3), (30.0, 1)])
    result = cluster.run()
    summary, end = result.summary, result.summary.makespan_s  # first arrival at 0
    # 1 prefill instance over [0, 10), 3 (2 starting until 15) over [10, 30), 1 until the end.
    assert summary.prefill_instance_s == pytest.approx(1 * 10 + 3 * 20 + 1 * (end - 30))
    assert summary.decode_instance_s == pytest.approx(end)
    assert summary.instance_hours == pytest.approx((70 + 2 * (end - 30) + 30) / 3600)
    assert summary.prefill_instance_s == pytest.approx(instance_seconds(result.timeline, "prefill"))
    rows = {r["time_s"]: r for r in result.timeline.to_pylist()}
    assert (rows[10.0]["num_prefill"], rows[10.0]["num_prefill_ready"]) == (3, 1)
    assert (rows[15.0]["num_prefill"], rows[15.0]["num_prefill_ready"]) == (3, 3)
    assert (rows[30.0]["num_prefill"], rows[30.0]["num_prefill_ready"]) == (1, 1)  # idle: gone
    assert rows[20.0]["arrival_rate_per_s"] == pytest.approx(1.0)
    # The newest instances drained; the original one (warmest cache) stays.
    drained = [iid for _, what, iid in cluster.autoscaler.changes if what == "drain"]
    assert drained == ["prefill-2", "prefill-1"]
    # Utilization is over the paid time.
    busy = sum(p.busy_s for p in cluster.every_prefill)
    assert summary.prefill_utilization == pytest.approx(busy / summary.prefill_instance_s)


def test_without_a_planner_results_match_the_fixed_planner_exactly():
    trace = generate_trace(SyntheticTraceConfig(num_requests=400, rate_per_s=30.0, seed=4))
    config = _config(num_prefill=2, num_decode=2, ttft_slo_s=1.0)
    plain = simulate(trace, policy_from_name("cache_aware"), config)
    fixed = simulate(
        trace, policy_from_name("cache_aware"), _config(**_fixed(config), ttft_slo_s=1.0)
    )
    assert plain.timeline is None and plain.summary.planner is None
    assert _comparable(plain.requests.to_pylist()) == _comparable(fixed.requests.to_pylist())
    assert plain.summary.num_rejected > 0  # a load where timing matters
    skip = {"wall_s", "requests_per_wall_s", "planner", "prefill_instance_s", "decode_instance_s"}
    skip |= {"instance_hours"}
    plain_dict, fixed_dict = plain.summary.to_dict(), fixed.summary.to_dict()
    for key, value in plain_dict.items():
        if key not in skip:
            assert value == fixed_dict[key] or (math.isnan(value) and math.isnan(fixed_dict[key]))
    makespan = plain.summary.makespan_s
    assert plain.summary.prefill_instance_s == 2 * makespan
    assert fixed.summary.prefill_instance_s == pytest.approx(2 * makespan)
    assert fixed.summary.instance_hours == pytest.approx(4 * makespan / 3600)


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows with NaN made equal to NaN (Arrow's ``equals`` never matches NaN)."""
    return [
        {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in rows
    ]


def _fixed(config: SimulationConfig) -> dict:
    return {
        "num_prefill": config.num_prefill,
        "num_decode": config.num_decode,
        "planner": PlannerConfig(name="fixed"),
    }


def test_autoscaling_settings_are_validated():
    with pytest.raises(ValueError, match=r"simulation\.planner"):
        _config(planner="slo")
    with pytest.raises(ValueError, match=r"simulation\.planner_interval_s"):
        _config(planner_interval_s=0)
    with pytest.raises(ValueError, match=r"simulation\.instance_startup_s"):
        _config(instance_startup_s=-1)


def test_instances_plot_is_a_png(tmp_path):
    trace = _steady([(20.0, 2.0), (20.0, 20.0)])
    runs = {
        "slo": simulate(trace, LeastLoadedScheduler(), _config(planner=SLO_PLANNER)),
        "fixed": simulate(trace, LeastLoadedScheduler(), _config(num_prefill=3)),
    }
    path = plot_instances({"step": runs}, tmp_path / "instances.png", bin_s=5.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
