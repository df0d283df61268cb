"""The autoscaling planners on hand-built views: which counts they choose, and when."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import pytest

from raycake.policies.planner import (
    PLANNER_NAMES,
    PLANNERS,
    DecodeInstanceStats,
    DynamoThresholdPlanner,
    LlmdThresholdPlanner,
    PlannerConfig,
    PlannerView,
    PrefillInstanceStats,
    SLOPlanner,
    make_planner,
    percentile,
    proportional_step,
)

TTFT_SLO_S = 1.0
TBT_SLO_S = 0.1


def view(
    now_s: float,
    num_prefill: int = 2,
    num_decode: int = 2,
    *,
    ttfts: tuple[float, ...] | None = None,
    queued_tokens: tuple[int, ...] | None = None,
    queued_requests: tuple[int, ...] | None = None,
    kvs: tuple[float, ...] | None = None,
    tbt_s: float | None = 0.05,
    waiting: tuple[int, ...] | None = None,
    num_rejected: int = 0,
    num_admitted: int = 100,
) -> PlannerView:
    """A view whose every instance reports; by default each signal sits mid-band (no change)."""
    ttfts = ttfts or (0.5,) * num_prefill
    queued_tokens = queued_tokens or (1000,) * len(ttfts)
    queued_requests = queued_requests or (2,) * len(ttfts)
    kvs = kvs or (0.6,) * num_decode
    waiting = waiting or (0,) * len(kvs)
    prefill = tuple(
        PrefillInstanceStats(f"prefill-{i}", ttft, tokens, requests)
        for i, (ttft, tokens, requests) in enumerate(
            zip(ttfts, queued_tokens, queued_requests, strict=True)
        )
    )
    decode = tuple(
        DecodeInstanceStats(f"decode-{i}", tbt_s, kv, num_running=8, num_waiting=w)
        for i, (kv, w) in enumerate(zip(kvs, waiting, strict=True))
    )
    return PlannerView(
        now_s=now_s,
        num_prefill=num_prefill,
        num_decode=num_decode,
        prefill=prefill,
        decode=decode,
        num_rejected=num_rejected,
        num_admitted=num_admitted,
        ttft_slo_s=TTFT_SLO_S,
        tbt_slo_s=TBT_SLO_S,
    )


def counts(decision) -> tuple[int, int]:
    return decision.num_prefill, decision.num_decode


def slo_planner(**overrides) -> SLOPlanner:
    return SLOPlanner(PlannerConfig(name="slo", **overrides))


# --- Helpers ------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    assert percentile([0.1, 0.9, 0.5], 0.9) == 0.9  # fewer than 10 values: the maximum
    assert percentile([float(i) for i in range(1, 21)], 0.9) == 18.0
    assert percentile([3.0], 0.5) == 3.0


def test_proportional_step_restores_the_threshold_within_max_step():
    assert proportional_step(2, 2.0, max_step=4) == 2  # twice over: double
    assert proportional_step(2, 1.125, max_step=4) == 1  # ceil(2.25) - 2
    assert proportional_step(4, 1.01, max_step=4) == 1  # just over: still at least one
    assert proportional_step(2, 10.0, max_step=4) == 4  # far over: capped


# --- SLO planner ----------------------------------------------------------------------------------


def test_ttft_breach_scales_prefill_up_in_proportion_and_leaves_decode():
    # p90 over 2 instances is the max: 1.6 s = 1.6x the SLO = 2x scale_up_at (0.8) -> 4.
    decision = slo_planner().plan(view(0.0, ttfts=(0.5, 1.6)))
    assert counts(decision) == (4, 2)
    assert "prefill 2->4" in decision.reason and "decode hold at 2" in decision.reason
    # Just over (0.9x SLO): one more.
    assert counts(slo_planner().plan(view(0.0, ttfts=(0.9, 0.9)))) == (3, 2)
    # Far over (10x SLO): max_step at once.
    assert counts(slo_planner(max_step=3).plan(view(0.0, ttfts=(10.0, 10.0)))) == (5, 2)


def test_tbt_breach_scales_decode_up_and_leaves_prefill():
    # 0.12 s per token = 1.2x the TBT SLO = 1.5x scale_up_at -> ceil(2 * 1.5) = 3.
    decision = slo_planner().plan(view(0.0, tbt_s=0.12))
    assert counts(decision) == (2, 3)
    assert "p90 TBT 1.20x SLO" in decision.reason


def test_high_kv_use_scales_decode_up():
    # Mean KV 0.95 / 0.85 -> ceil(2 * 1.118) = 3; TBT is within its band.
    assert counts(slo_planner().plan(view(0.0, kvs=(0.95, 0.95)))) == (2, 3)
    # 0.95 and 0.55 average 0.75 < 0.85: one hot instance is a balance problem, not capacity.
    assert counts(slo_planner().plan(view(0.0, kvs=(0.95, 0.55)))) == (2, 2)


def test_roles_cool_down_independently():
    planner = slo_planner(cooldown_s=30.0)
    assert counts(planner.plan(view(0.0, ttfts=(0.9, 0.9)))) == (3, 2)
    # Prefill is cooling down, decode is not: a TBT breach 10 s later still adds decode.
    decision = planner.plan(view(10.0, num_prefill=3, ttfts=(0.9,) * 3, tbt_s=0.12))
    assert counts(decision) == (3, 3)
    assert "prefill hold at 3" in decision.reason and "cooling down (20s left)" in decision.reason


def test_cooldown_holds_a_second_breach_until_it_ends():
    planner = slo_planner(cooldown_s=30.0)
    assert counts(planner.plan(view(0.0, ttfts=(0.9, 0.9)))) == (3, 2)
    for now in (10.0, 20.0, 29.9):
        assert counts(planner.plan(view(now, num_prefill=3, ttfts=(0.9,) * 3))) == (3, 2)
    assert counts(planner.plan(view(30.0, num_prefill=3, ttfts=(0.9,) * 3))) == (4, 2)


def test_never_beyond_min_or_max():
    capped = slo_planner(max_prefill=3, max_decode=2)
    decision = capped.plan(view(0.0, ttfts=(10.0, 10.0), tbt_s=1.0))
    assert counts(decision) == (3, 2)
    assert "decode hold at 2" in decision.reason and "at max" in decision.reason
    # Counts outside the bounds come back within them at once, whatever the load.
    floor = slo_planner(min_prefill=3, min_decode=3, cooldown_s=30.0)
    assert counts(floor.plan(view(0.0, ttfts=(0.1, 0.1), kvs=(0.1, 0.1)))) == (3, 3)
    # At the minimum, a long low load removes nothing.
    planner = slo_planner(min_prefill=2, min_decode=2)
    for now in range(0, 600, 10):
        low = view(float(now), ttfts=(0.1, 0.1), kvs=(0.1, 0.1), tbt_s=0.01)
        assert counts(planner.plan(low)) == (2, 2)


def test_a_signal_between_the_thresholds_changes_nothing():
    planner = slo_planner(cooldown_s=0.0, down_stable_s=60.0)
    for step in range(100):  # 0.35x and 0.75x the SLO in turn: inside the band (0.3, 0.8)
        ratio = 0.35 if step % 2 else 0.75
        kv = 0.45 if step % 2 else 0.8  # inside (0.4, 0.85)
        decision = planner.plan(view(step * 5.0, ttfts=(ratio, ratio), kvs=(kv, kv)))
        assert counts(decision) == (2, 2), decision.reason
    # One role held just above its down threshold for 10 minutes while all else is low: that
    # role keeps its count (one instance fewer would fit, but its load is not low).
    cases = [  # (TTFT x SLO, KV use, TBT s, the role that holds)
        (0.35, 0.1, 0.01, "prefill"),
        (0.1, 0.41, 0.01, "decode"),
        (0.1, 0.1, 0.035, "decode"),
    ]
    for ttft, kv, tbt, role in cases:
        planner = slo_planner(cooldown_s=0.0, down_stable_s=60.0)
        num_prefill, num_decode = 2, 3
        for now in range(0, 600, 10):
            steady = view(
                float(now),
                num_prefill,
                num_decode,
                ttfts=(ttft,) * num_prefill,
                kvs=(kv,) * num_decode,
                tbt_s=tbt,
            )
            num_prefill, num_decode = counts(planner.plan(steady))
        assert (num_prefill, num_decode) == ((2, 1) if role == "prefill" else (1, 3))


def test_short_dips_below_the_down_threshold_change_nothing():
    planner = slo_planner(cooldown_s=0.0, down_stable_s=60.0)
    for step in range(60):  # low for 50 s, then back in the band for a window, repeatedly
        ratio = 0.5 if step % 6 == 5 else 0.1
        assert counts(planner.plan(view(step * 10.0, ttfts=(ratio, ratio)))) == (2, 2)


def test_scale_down_waits_for_down_stable_s_and_removes_one_at_a_time():
    planner = slo_planner(cooldown_s=30.0, down_stable_s=60.0)
    num_prefill, num_decode, changes = 4, 4, []
    for now in range(0, 400, 10):
        low = view(
            float(now),
            num_prefill,
            num_decode,
            ttfts=(0.1,) * num_prefill,
            kvs=(0.1,) * num_decode,
            tbt_s=None,  # idle decode: no token in the window
        )
        decision = planner.plan(low)
        assert num_prefill - decision.num_prefill in (0, 1)
        assert num_decode - decision.num_decode in (0, 1)
        if counts(decision) != (num_prefill, num_decode):
            changes.append((now, *counts(decision)))
        num_prefill, num_decode = counts(decision)
    # Low from t=0: the first removal at 60 s; the low clock restarts with the new count's
    # first window (70 s), so the next at 130 s, then 200 s, down to the minimum of 1.
    assert changes == [(60, 3, 3), (130, 2, 2), (200, 1, 1)]


def test_scale_down_keeps_the_remaining_instances_under_the_up_threshold():
    # 0.25x the SLO on 2 instances becomes 0.5x on 1 (< 0.8); KV 0.35 becomes 0.7 (< 0.85).
    low = view(0.0, ttfts=(0.25, 0.25), kvs=(0.35, 0.35), tbt_s=0.01)
    assert counts(slo_planner(cooldown_s=0.0, down_stable_s=0.0).plan(low)) == (1, 1)
    # Tighter up thresholds: 0.5x > 0.45 and KV 0.7 > 0.65 on one instance, so both stay.
    tight = slo_planner(cooldown_s=0.0, down_stable_s=0.0, scale_up_at=0.45, kv_scale_up_at=0.65)
    assert counts(tight.plan(low)) == (2, 2)


def test_rejections_drive_prefill_up_and_block_scale_down():
    # TTFT is low (rejected requests never queue), but 10% were rejected: one more prefill.
    planner = slo_planner()
    decision = planner.plan(view(0.0, ttfts=(0.1, 0.1), num_rejected=10, num_admitted=90))
    assert counts(decision) == (3, 2)
    assert "10% of requests rejected" in decision.reason
    # Under reject_up_fraction (1 of 100), no scale-up; but no scale-down either, ever.
    planner = slo_planner(down_stable_s=0.0, cooldown_s=0.0)
    for now in range(0, 300, 10):
        few = view(float(now), ttfts=(0.1, 0.1), num_rejected=1, num_admitted=99)
        assert counts(planner.plan(few))[0] == 2


def test_without_slos_the_slo_planner_uses_rejections_and_kv_only():
    bare = PlannerView(
        now_s=0.0,
        num_prefill=2,
        num_decode=2,
        prefill=(PrefillInstanceStats("p0", 9.0, 100_000), PrefillInstanceStats("p1", 9.0, 0)),
        decode=(DecodeInstanceStats("d0", 5.0, 0.95, 8), DecodeInstanceStats("d1", 5.0, 0.95, 8)),
    )
    decision = slo_planner().plan(bare)
    assert counts(decision) == (2, 3)  # KV 0.95 adds decode; TTFT and TBT have no SLO
    assert "no TTFT SLO" in decision.reason


# --- Baselines ------------------------------------------------------------------------------------


def dynamo(**overrides) -> DynamoThresholdPlanner:
    return DynamoThresholdPlanner(PlannerConfig(name="dynamo", cooldown_s=30.0, **overrides))


def test_dynamo_scales_prefill_one_at_a_time_on_queued_tokens():
    planner = dynamo()
    # 20k queued tokens per instance is 5x the threshold (4096): still one worker.
    decision = planner.plan(view(0.0, queued_tokens=(20_000, 20_000)))
    assert counts(decision) == (3, 2)
    # TTFT far over the SLO means nothing to it: its signal is the queue (1000 < 4096 here).
    assert counts(dynamo().plan(view(0.0, ttfts=(10.0, 10.0)))) == (2, 2)
    # Under 512 tokens per instance: one fewer.
    assert counts(dynamo().plan(view(0.0, queued_tokens=(100, 300)))) == (1, 2)


def test_dynamo_adjusts_once_per_interval_and_skips_a_draining_queue():
    planner = dynamo()
    assert counts(planner.plan(view(0.0, queued_tokens=(6000, 6000)))) == (3, 2)
    # Within the adjustment interval: nothing, whatever the load.
    assert counts(planner.plan(view(10.0, 3, queued_tokens=(50_000,) * 3))) == (3, 2)
    # Next interval: 5000 per instance, down 1000 from 6000; 3 intervals ahead that is 2000,
    # under the threshold, so Dynamo waits for the queue to drain.
    decision = planner.plan(view(30.0, 3, queued_tokens=(5000,) * 3))
    assert counts(decision) == (3, 2) and "draining" in decision.reason


def test_dynamo_scales_decode_on_kv_with_a_grace_period_after_adding():
    planner = dynamo()
    assert counts(planner.plan(view(0.0, kvs=(0.95, 0.95)))) == (2, 3)  # > 0.9
    for now in (30.0, 60.0, 90.0):  # < 0.5, but within the 3 intervals after adding one
        decision = planner.plan(view(now, 2, 3, kvs=(0.3,) * 3))
        assert counts(decision) == (2, 3) and "grace" in decision.reason
    assert counts(planner.plan(view(120.0, 2, 3, kvs=(0.3,) * 3))) == (2, 2)
    # Between 0.5 and 0.9: hold; TBT far over its SLO is not its signal.
    assert counts(dynamo().plan(view(0.0, kvs=(0.7, 0.7), tbt_s=1.0))) == (2, 2)


def test_dynamo_waits_while_workers_join():
    starting = view(0.0, queued_tokens=(20_000, 20_000), kvs=(0.95, 0.95))
    joining = replace(starting, num_decode=3)  # one decode not reporting
    decision = dynamo().plan(joining)
    assert counts(decision) == (2, 3) and "joining" in decision.reason


def llmd(**overrides) -> LlmdThresholdPlanner:
    return LlmdThresholdPlanner(PlannerConfig(name="llmd", cooldown_s=30.0, **overrides))


def test_llmd_scales_up_when_spare_kv_or_queue_runs_low():
    # KV 0.75 on both: spare 0.8 - 0.75 = 0.05 < 0.1 -> one more decode.
    assert counts(llmd().plan(view(0.0, kvs=(0.75, 0.75)))) == (2, 3)
    # 3 waiting on each: spare queue 5 - 3 = 2 < 3 -> one more decode.
    assert counts(llmd().plan(view(0.0, kvs=(0.3, 0.3), waiting=(3, 3)))) == (2, 3)
    # Every instance saturated (KV >= 0.8): one more.
    assert counts(llmd().plan(view(0.0, kvs=(0.9, 0.9)))) == (2, 3)
    # Prefill on its queued requests: 3 each -> spare 2 < 3 -> one more prefill.
    assert counts(llmd().plan(view(0.0, queued_requests=(3, 3)))) == (3, 2)
    # TTFT and TBT far over their SLOs are not its signals.
    assert counts(llmd().plan(view(0.0, ttfts=(9.0, 9.0), tbt_s=1.0))) == (2, 2)


def test_llmd_scales_down_only_when_the_rest_keep_their_spare():
    # 3 x 0.1 KV on 2 instances: 0.15 each, spare 0.65 >= 0.1 -> one fewer decode. Prefill:
    # 2 + 2 queued on 1 instance would leave spare 1 < 3 -> keep both.
    idle = view(0.0, 2, 3, kvs=(0.1, 0.1, 0.1))
    assert counts(llmd().plan(idle)) == (2, 2)
    # 2 x 0.4 on 1 instance: 0.8, spare 0 < 0.1 -> keep both.
    assert counts(llmd().plan(view(0.0, kvs=(0.4, 0.4)))) == (2, 2)
    # One saturated, one nearly idle: the idle one's spare is ample, but the safety simulation
    # needs at least 2 unsaturated instances -> keep both.
    assert counts(llmd().plan(view(0.0, kvs=(0.85, 0.05)))) == (2, 2)
    # Prefill: no queue on 2 instances -> one fewer (its spare queue stays 5).
    assert counts(llmd().plan(view(0.0, queued_requests=(0, 0), kvs=(0.4, 0.4)))) == (1, 2)


def test_llmd_does_not_scale_up_while_instances_start_and_reconciles_per_interval():
    saturated = view(0.0, kvs=(0.9, 0.9))
    starting = replace(saturated, num_decode=3)
    decision = llmd().plan(starting)
    assert counts(decision) == (2, 3) and "still starting" in decision.reason
    planner = llmd()
    assert counts(planner.plan(saturated)) == (2, 3)
    assert counts(planner.plan(view(10.0, 2, 3, kvs=(0.9,) * 3))) == (2, 3)  # same interval
    assert counts(planner.plan(view(30.0, 2, 3, kvs=(0.9,) * 3))) == (2, 4)


def test_fixed_never_changes_counts():
    planner = make_planner(PlannerConfig(name="fixed", min_prefill=3, cooldown_s=0.0))
    for now, load in enumerate((10.0, 0.0, 10.0)):
        decision = planner.plan(
            view(float(now), ttfts=(load, load), kvs=(0.99, 0.99), num_rejected=50)
        )
        assert counts(decision) == (2, 2)  # even below its min_prefill: it never acts


# --- Config and registry --------------------------------------------------------------------------


def test_every_name_builds_its_planner():
    assert set(PLANNERS) == set(PLANNER_NAMES)
    for name in PLANNER_NAMES:
        assert make_planner(PlannerConfig(name=name)).name == name
    assert PlannerConfig().name == "fixed"  # a deployment scales only when asked to


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "magic", r"planner.name: expected one of \['dynamo', 'fixed', 'llmd', 'slo'\]"),
        ("min_prefill", True, r"planner.min_prefill: expected a positive integer, got True"),
        ("min_decode", 0, r"planner.min_decode: expected a positive integer"),
        ("max_decode", 0, r"planner.max_decode: expected an integer >= planner.min_decode \(1\)"),
        ("max_prefill", 2.0, r"planner.max_prefill: expected an integer >= planner.min_prefill"),
        ("scale_up_at", math.nan, r"planner.scale_up_at: expected a finite number >= 0, got nan"),
        ("scale_up_at", True, r"planner.scale_up_at: expected a finite number"),
        ("scale_down_at", 0.9, r"planner.scale_down_at: expected a number below planner.scale_up"),
        ("kv_scale_up_at", 1.5, r"planner.kv_scale_up_at: expected a finite number >= 0 and <= 1"),
        ("reject_up_fraction", math.inf, r"planner.reject_up_fraction: expected a finite number"),
        ("cooldown_s", True, r"planner.cooldown_s: expected a finite number >= 0, got True"),
        ("down_stable_s", -1.0, r"planner.down_stable_s: expected a finite number >= 0"),
        ("max_step", 0, r"planner.max_step: expected a positive integer"),
        ("dynamo_queue_down_tokens", 5000.0, r"planner.dynamo_queue_down_tokens: expected a num"),
        ("dynamo_kv_up_at", math.nan, r"planner.dynamo_kv_up_at: expected a finite number"),
        ("llmd_kv_cache_threshold", 0.0, r"planner.llmd_kv_cache_threshold: expected a finite"),
        ("llmd_queue_length_threshold", 2.5, r"planner.llmd_queue_length_threshold: expected"),
        ("llmd_queue_spare_trigger", 6.0, r"planner.llmd_queue_spare_trigger: expected a finite"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PlannerConfig(**{field: value})


def test_view_errors_name_the_field():
    with pytest.raises(ValueError, match=r"decode instance 'd0'.kv_utilization: expected"):
        DecodeInstanceStats("d0", 0.1, 1.2, 1)
    with pytest.raises(ValueError, match=r"prefill instance 'p0'.predicted_ttft_s: expected"):
        PrefillInstanceStats("p0", math.nan, 0)
    with pytest.raises(ValueError, match=r"planner view.prefill: expected at most num_prefill"):
        PlannerView(0.0, 1, 1, prefill=(PrefillInstanceStats("p0", 0.1, 0),) * 2)
    with pytest.raises(ValueError, match=r"planner view.num_decode: expected an integer >= 0"):
        PlannerView(0.0, 1, True)
    with pytest.raises(ValueError, match=r"planner view.ttft_slo_s: expected a finite number > 0"):
        PlannerView(0.0, 1, 1, ttft_slo_s=0.0)


def test_planner_imports_without_torch_or_ray():
    code = (
        "import sys\n"
        "sys.modules.update(torch=None, ray=None, numpy=None)\n"
        "import raycake.policies.planner\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_slo_planner_does_not_scale_down_while_an_instance_is_still_starting():
    config = PlannerConfig(name="slo", cooldown_s=0.0, down_stable_s=0.0)
    planner = make_planner(config)
    idle = [PrefillInstanceStats("prefill-0", predicted_ttft_s=0.01, queued_prefill_tokens=0)]
    # Two counted, one reporting: the second is still starting; low load holds.
    view = PlannerView(now_s=0.0, num_prefill=2, num_decode=1, prefill=tuple(idle), ttft_slo_s=1.0)
    decision = planner.plan(view)
    assert decision.num_prefill == 2 and "still starting" in decision.reason
    both = (*idle, PrefillInstanceStats("prefill-1", 0.01, 0))
    view = PlannerView(now_s=1.0, num_prefill=2, num_decode=1, prefill=both, ttft_slo_s=1.0)
    assert planner.plan(view).num_prefill == 1


def test_slo_planner_scales_decode_on_full_batch_slots_with_kv_to_spare():
    planner = make_planner(PlannerConfig(name="slo", cooldown_s=0.0))
    full = DecodeInstanceStats(
        "decode-0", tbt_s=None, kv_utilization=0.2, num_running=128, slot_utilization=1.0
    )
    view = PlannerView(now_s=0.0, num_prefill=1, num_decode=1, decode=(full,), tbt_slo_s=0.1)
    decision = planner.plan(view)
    # 1.0 / 0.85 of the up threshold over one instance: ceil(1.18) - 1 = 1 more.
    assert decision.num_decode == 2 and "KV/slot use 1.00" in decision.reason
    # Only KV use (0.2) would have held it at 1.
    light = replace(full, slot_utilization=0.2)
    again = make_planner(PlannerConfig(name="slo", cooldown_s=0.0))
    view = PlannerView(now_s=0.0, num_prefill=1, num_decode=1, decode=(light,), tbt_slo_s=0.1)
    assert again.plan(view).num_decode == 1


def test_decode_stats_check_slot_utilization():
    with pytest.raises(ValueError, match=r"decode instance 'decode-0'.slot_utilization"):
        DecodeInstanceStats("decode-0", None, 0.1, 1, slot_utilization=1.5)


def test_an_idle_prefill_role_shrinks_even_when_one_prefill_is_a_large_part_of_the_slo():
    # Idle (no wait), but a bare prefill is 0.5x the SLO: TTFT alone (0.5 > 0.3) would hold
    # the count forever, though a second instance shortens nothing.
    idle = tuple(PrefillInstanceStats(f"prefill-{i}", 0.5, 0, queued_s=0.0) for i in range(2))
    view = PlannerView(now_s=0.0, num_prefill=2, num_decode=1, prefill=idle, ttft_slo_s=1.0)
    planner = make_planner(PlannerConfig(name="slo", cooldown_s=0.0, down_stable_s=0.0))
    assert planner.plan(view).num_prefill == 1
    # A queue of 0.2x on each of the two would become 0.4x on one: 0.5 + 0.4 > 0.8, so they stay.
    busy = tuple(PrefillInstanceStats(f"prefill-{i}", 0.7, 0, queued_s=0.2) for i in range(2))
    view = PlannerView(now_s=1.0, num_prefill=2, num_decode=1, prefill=busy, ttft_slo_s=1.0)
    planner = make_planner(PlannerConfig(name="slo", cooldown_s=0.0, down_stable_s=0.0))
    assert planner.plan(view).num_prefill == 2


def test_prefill_stats_check_that_the_wait_is_part_of_the_ttft():
    with pytest.raises(ValueError, match=r"prefill instance 'p'.queued_s"):
        PrefillInstanceStats("p", 0.5, 0, queued_s=0.6)
