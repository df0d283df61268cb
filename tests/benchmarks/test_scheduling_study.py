"""benchmarks/scheduling_study.py on a small generated trace: the study's finding holds (the
conductor, cache-aware with the global store and early rejection, serves the most requests
within SLO where the baselines saturate), the table's columns hang together, and the goals are
computed as stated (checked on hand-built rows)."""

from __future__ import annotations

import pytest

import benchmarks.scheduling_study as study
from raycake.policies.scheduling_config import SCHEDULING_POLICY_NAMES, SchedulingConfig
from raycake.sim.traces import SyntheticTraceConfig, generate_trace, write_trace

REQUESTS = 150
RATES = (1.0, 1.5)


@pytest.fixture(scope="module")
def study_rows():
    """Tool/agent calls over 100 shared 16k-token contexts (more than one prefill instance's
    cache holds; the global store pools two instances' worth), 2 requests/s on 2P + 2D
    8 x A800 Llama-3-70B instances: at x1 the best baseline still meets both SLOs, at x1.5
    every baseline saturates. Every policy at both rates: ~3 s."""
    trace = generate_trace(
        SyntheticTraceConfig(
            num_requests=REQUESTS,
            rate_per_s=2.0,
            session_share=0.0,
            agent_share=1.0,
            num_agent_contexts=100,
            agent_context_tokens=16_000,
            mean_output_tokens=150,
            seed=1,
        )
    )
    config = study.cluster_config(num_prefill=2, num_decode=2)
    return study.run_study({"agents": trace}, list(RATES), config, log=lambda _: None)


def test_the_conductor_serves_the_most_requests_within_slo_where_the_baselines_saturate(
    study_rows,
):
    rows, _ = study_rows
    within = {(r["policy"], r["rate"]): r["within_slo"] for r in rows}
    # The baselines are every other policy the conductor can be configured with.
    baselines = [name for name in SCHEDULING_POLICY_NAMES if name != "cache_aware"]
    assert sorted(baselines) == sorted(study.OTHERS)
    # The conductor as configured by default: the global store and early rejection.
    default = SchedulingConfig()
    assert default.use_store and default.enable_early_rejection
    assert study.CONDUCTOR == "cache_aware global+early"
    best = {rate: max(within[(name, rate)] for name in baselines) for rate in RATES}
    # x1: the best baseline (SGLang's router) serves all 150 in SLO, as does the conductor;
    # random / round-robin / least-loaded, blind to the caches, already serve only ~57.
    assert best[1.0] >= 0.9 * REQUESTS
    assert within[(study.CONDUCTOR, 1.0)] >= best[1.0]
    assert max(within[(name, 1.0)] for name in ("random", "round_robin", "least_loaded")) < (
        0.5 * REQUESTS
    )
    # x1.5: every baseline saturates (best: SGLang, 60 = 40%); the conductor serves 129 (86%).
    assert best[1.5] < 0.9 * REQUESTS
    assert within[(study.CONDUCTOR, 1.5)] >= study.GOAL_MARGIN * best[1.5]
    # The goal check reads the same from the table.
    conductor_goal = study.check_goals(rows)[0]
    assert (
        conductor_goal.passed and "at x1.5 (best other sglang_cache_aware" in conductor_goal.detail
    )


def test_the_same_admission_rule_closes_most_of_the_gap(study_rows):
    rows, _ = study_rows
    within = {(r["policy"], r["rate"]): r["within_slo"] for r in rows}
    rejected = {(r["policy"], r["rate"]): r["rejected"] for r in rows}
    # Admission control alone lifts the cache-blind routers from ~57 to ~123 of 150 at x1 ...
    for name in ("random", "round_robin", "least_loaded"):
        assert within[(name, 1.0)] < 0.4 * REQUESTS
        assert within[(f"{name}+admit", 1.0)] > 0.8 * REQUESTS
    # ... and SGLang's router from 60 to 117 at x1.5, rejecting 33.
    assert (within[("sglang_cache_aware", 1.5)], within[("sglang_cache_aware+admit", 1.5)]) == (
        60,
        117,
    )
    assert rejected[("sglang_cache_aware+admit", 1.5)] == 33
    best_admitted = max(within[(name, 1.5)] for name in study.ADMITTED)
    assert best_admitted == within[("sglang_cache_aware+admit", 1.5)]
    # What placement adds beyond admission: 129 against 117 (x1.10), short of the 20% goal.
    checks = study.check_goals(rows)
    assert not checks[1].passed
    assert checks[1].detail == (
        "at x1.5 (best other sglang_cache_aware+admit: 117 of 150, 78.0%) "
        "cache_aware global+early: 129 (86.0%), ratio 1.10"
    )


def test_the_table_hangs_together(study_rows):
    rows, results = study_rows
    factories = study.policy_factories()
    assert list(factories) == [
        "random",
        "round_robin",
        "least_loaded",
        "sglang_cache_aware",
        "dynamo_kv",
        "random+admit",
        "round_robin+admit",
        "least_loaded+admit",
        "sglang_cache_aware+admit",
        "dynamo_kv+admit",
        "cache_aware local",
        "cache_aware local+early",
        "cache_aware local+predictive",
        "cache_aware global",
        "cache_aware global+early",
        "cache_aware global+predictive",
    ]
    assert len(rows) == len(results) == len(RATES) * len(factories)
    for row in rows:
        assert list(row) == study.COLUMNS
        assert row["requests"] == REQUESTS
        assert row["within_slo"] == round(row["within_slo_share"] * REQUESTS)
        assert 0 <= row["within_slo"] <= row["requests"] - row["rejected"]
        assert 0 <= row["cache_hit_rate"] <= 1
        if not any(mode in row["policy"] for mode in ("early", "predictive", "admit")):
            assert row["rejected"] == 0  # no admission control
        summary = results[(row["trace"], row["policy"], row["rate"])].summary
        assert row["goodput_rps"] == summary.goodput_rps
    # The cache-aware routers hit far more than the cache-blind ones (~0.47 against ~0.30).
    hit = {(r["policy"], r["rate"]): r["cache_hit_rate"] for r in rows}
    for rate in RATES:
        blind = max(hit[(name, rate)] for name in ("random", "round_robin", "least_loaded"))
        assert hit[(study.CONDUCTOR, rate)] > blind + 0.1
    checks = study.check_goals(rows)
    assert [c.goal.split(" serves")[0].split(" >=")[0] for c in checks] == [
        "conductor (global + early rejection)",
        "conductor (global + early rejection)",
        "without admission control (global)",
        "global-store hit rate",
    ]
    assert checks[1].goal.endswith("than the best other under the same admission rule (+admit)")


def _rows(within: dict[tuple[str, float], int], hits: dict[tuple[str, float], float]) -> list:
    rows = []
    for (policy, rate), count in within.items():
        rows.append(
            {
                "trace": "t",
                "policy": policy,
                "rate": rate,
                "requests": 100,
                "within_slo": count,
                "within_slo_share": count / 100,
                "cache_hit_rate": hits.get((policy, rate), 0.0),
            }
        )
    return rows


def _hand_built(
    best_other_at_2: int, conductor_at_2: int, local_hit_at_2: float, best_admitted_at_2: int = 55
) -> list:
    within, hits = {}, {}
    for rate, best, admitted in ((1.0, 95, 97), (2.0, best_other_at_2, best_admitted_at_2)):
        for policy in study.OTHERS:
            within[(policy, rate)] = best if policy == "dynamo_kv" else best - 10
        for policy in study.ADMITTED:
            within[(policy, rate)] = admitted if policy == "random+admit" else admitted - 5
        for store in ("local", "global"):
            for suffix in ("", "+early", "+predictive"):
                name = f"cache_aware {store}{suffix}"
                within[(name, rate)] = conductor_at_2 if rate == 2.0 else 99
                hits[(name, rate)] = 0.5 if store == "global" else 0.4
    within[("cache_aware global", 2.0)] = best_other_at_2  # no edge without admission control
    hits[("cache_aware local+early", 2.0)] = local_hit_at_2
    return _rows(within, hits)


def test_goals_at_the_rate_where_the_others_start_failing():
    # At x1 the best other (dynamo_kv) meets both SLOs for 95% (not failing); at x2 for 50%.
    checks = study.check_goals(_hand_built(50, 60, 0.4))
    assert [c.passed for c in checks] == [True, False, False, True]
    assert "at x2 (best other dynamo_kv: 50 of 100, 50.0%)" in checks[0].detail
    assert "cache_aware global+early: 60 (60.0%), ratio 1.20" in checks[0].detail
    # Against the baselines under the same admission rule: the best (random+admit) serves 55.
    assert "at x2 (best other random+admit: 55 of 100, 55.0%)" in checks[1].detail
    assert "ratio 1.09" in checks[1].detail
    assert "ratio 1.00" in checks[2].detail
    assert "smallest margin at x1 (no rejection): global 50.0% vs local 40.0%" in checks[3].line()
    # 50 admitted within SLO: 60 is 1.2 x that.
    checks = study.check_goals(_hand_built(50, 60, 0.4, best_admitted_at_2=50))
    assert [c.passed for c in checks] == [True, True, False, True]
    # 59 is under 1.2 x 50; a local-only hit rate over the global one fails goal 2 and says where.
    checks = study.check_goals(_hand_built(50, 59, 0.55))
    assert [c.passed for c in checks] == [False, False, False, False]
    assert checks[3].detail.endswith("below at x2+early")
    assert checks[0].line().startswith("FAIL [t] conductor (global + early rejection)")


def test_the_admission_comparison_is_made_where_the_admitted_baselines_fail():
    # Admission keeps the admitted baselines over 90% at x1 (97) but not at x2 (92 is not
    # under 90%, so no swept rate makes them fail).
    checks = study.check_goals(_hand_built(50, 60, 0.4, best_admitted_at_2=92))
    assert not checks[1].passed
    assert checks[1].detail.startswith("no swept rate makes the others fail")


def test_goal_fails_when_no_rate_makes_the_others_fail():
    checks = study.check_goals(_hand_built(90, 99, 0.4))
    assert not checks[0].passed
    assert "no swept rate makes the others fail (best >= 90% within SLO up to x2)" in (
        checks[0].detail
    )


def test_traces_load_and_a_missing_mooncake_trace_is_skipped(tmp_path, monkeypatch, capsys):
    path = write_trace(
        generate_trace(SyntheticTraceConfig(num_requests=5, seed=1)), tmp_path / "mine.jsonl"
    )
    monkeypatch.setattr(study, "MOONCAKE_TRACE", tmp_path / "absent.jsonl")
    args = study.parse_args(["--trace", str(path), "--no-generated", "--rates", "2", "1", "2"])
    assert args.rates == [1.0, 2.0]
    traces = study.load_traces(args)
    assert list(traces) == ["mine"] and traces["mine"].num_rows == 5
    assert "skipping the Mooncake synthetic trace" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.parse_args(["--rates", "0"])
