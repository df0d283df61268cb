"""The conductor's early-rejection rule wrapped around the baseline routers, over hand-built
views with numbers worked by hand.

Shared setup (costs in worked_costs.py): a 1,024-token prompt in 16-token blocks with 128
output tokens, i.e. ceil(1152 / 16) = 72 KV blocks; prefill costs 0.02 + 2e-4 * new + 1e-7 *
new * (cached + new / 2) seconds (0.2772288 from scratch, 0.0941376 after a 48-block prefix),
decode steps 0.01 + 5e-4 * batch + 1e-6 * context seconds.
"""

from __future__ import annotations

import pytest

from raycake.policies.admission_control import AdmissionControl, admission_check
from raycake.policies.baseline_routers import SGLangCacheAwareRouter
from raycake.policies.scheduling import (
    CacheAwareScheduler,
    ClusterView,
    DecodeInstanceView,
    LeastLoadedScheduler,
    PrefillInstanceView,
    Rejection,
    RequestView,
    RoundRobinScheduler,
    ScheduleDecision,
    SchedulingConfig,
    scheduling_policy_from_config,
)
from tests.policies.worked_costs import COST, FROM_SCRATCH_S, WITH_PREFIX_S


def prefill(instance_id: str, queued_s: float = 0.0, cached_blocks: int = 0) -> PrefillInstanceView:
    return PrefillInstanceView(instance_id, queued_s, int(queued_s > 0), COST, cached_blocks)


def decode(instance_id: str, running: int = 0, context: int = 0, free: int = 1000, **kw):
    return DecodeInstanceView(
        instance_id, running, kw.pop("max_num_seqs", 64), context, free, COST, **kw
    )


def request(**kw) -> RequestView:
    fields = {"request_id": "r", "num_prompt_tokens": 1024, "block_size": 16, "max_tokens": 128}
    return RequestView(**{**fields, "store_block_bytes": 1_000_000, **kw})


def cluster(prefills, decodes, bandwidth: float = 1e9) -> ClusterView:
    return ClusterView(list(prefills), list(decodes), bandwidth)


# p1 has the shortest queue; p0 holds a 48-block prefix of the prompt behind a longer one.
PREFILLS = [prefill("p0", 0.4, cached_blocks=48), prefill("p1", 0.3)]
# d1 runs the fewest requests but holds the most context.
DECODES = [decode("d0", running=9, context=9000), decode("d1", running=3, context=30_000)]


def test_rejects_the_routers_choice_by_its_predicted_ttft():
    req = request(ttft_slo_s=0.55)
    # Least loaded: p1, 0.3 + 0.2772288 = 0.5772288 > 0.55.
    rejection = AdmissionControl(LeastLoadedScheduler()).schedule(req, cluster(PREFILLS, DECODES))
    assert isinstance(rejection, Rejection)
    assert rejection.predicted_ttft_s == pytest.approx(0.3 + FROM_SCRATCH_S)
    assert rejection.reason == "TTFT SLO: predicted TTFT 0.5772 s on 'p1' > ttft_slo_s 0.55 s"
    # Its decode pick (d1, 3 of 64 slots) has room: step(4, 31024) = 0.043024.
    assert rejection.predicted_tbt_s == pytest.approx(0.01 + 0.002 + 0.031024)
    # The conductor places the same request on the prefix holder, 0.4 + 0.0941376 = 0.4941 s.
    conductor = CacheAwareScheduler(use_store=False).schedule(req, cluster(PREFILLS, DECODES))
    assert isinstance(conductor, ScheduleDecision) and conductor.prefill_instance_id == "p0"
    assert conductor.predicted_ttft_s == pytest.approx(0.4 + WITH_PREFIX_S)
    # Under a looser SLO the wrapper admits the choice unchanged, with the same predictions.
    loose = request(ttft_slo_s=0.6)
    inner = LeastLoadedScheduler().schedule(loose, cluster(PREFILLS, DECODES))
    admitted = AdmissionControl(LeastLoadedScheduler()).schedule(loose, cluster(PREFILLS, DECODES))
    assert admitted == inner
    assert (admitted.prefill_instance_id, admitted.decode_instance_id) == ("p1", "d1")


def test_rejects_the_routers_decode_choice_by_its_predicted_tbt():
    req = request(tbt_slo_s=0.04)
    rejection = AdmissionControl(LeastLoadedScheduler()).schedule(req, cluster(PREFILLS, DECODES))
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "TBT SLO: predicted TBT 0.04302 s on 'd1' > tbt_slo_s 0.04 s"
    # The conductor picks d0: step(10, 10024) = 0.025024 <= 0.04.
    conductor = CacheAwareScheduler(use_store=False).schedule(req, cluster(PREFILLS, DECODES))
    assert isinstance(conductor, ScheduleDecision) and conductor.decode_instance_id == "d0"
    assert conductor.predicted_tbt_s == pytest.approx(0.01 + 0.005 + 0.010024)
    # Both SLOs missed: both reasons, TTFT first (as the conductor lists them).
    both = AdmissionControl(LeastLoadedScheduler()).schedule(
        request(ttft_slo_s=0.5, tbt_slo_s=0.04), cluster(PREFILLS, DECODES)
    )
    assert both.reason.startswith("TTFT SLO: predicted TTFT 0.5772 s")
    assert both.reason.endswith("TBT SLO: predicted TBT 0.04302 s on 'd1' > tbt_slo_s 0.04 s")


@pytest.mark.parametrize(
    ("chosen", "detail"),
    [
        # 71 free blocks < the 72 the prompt plus 128 outputs need.
        (decode("d0", free=71), "71 free KV blocks (needs 72) and 0 of 64 batch slots taken"),
        # Every batch slot taken.
        (
            decode("d0", running=8, context=800, max_num_seqs=8),
            "1000 free KV blocks (needs 72) and 8 of 8 batch slots taken",
        ),
    ],
)
def test_rejects_when_the_chosen_decode_instance_has_no_room(chosen, detail):
    view = cluster([prefill("p0")], [chosen])
    rejection = AdmissionControl(RoundRobinScheduler()).schedule(request(), view)
    assert isinstance(rejection, Rejection) and rejection.predicted_tbt_s is None
    assert rejection.reason == f"decode capacity: 'd0' has {detail}"
    assert rejection.predicted_ttft_s == pytest.approx(FROM_SCRATCH_S)
    # The unwrapped router places it there to wait for memory.
    assert isinstance(RoundRobinScheduler().schedule(request(), view), ScheduleDecision)


def test_no_slo_no_rejection_for_it():
    view = cluster([prefill("p0", 100.0)], [decode("d0", running=60, context=500_000)])
    decision = AdmissionControl(LeastLoadedScheduler()).schedule(request(), view)
    assert isinstance(decision, ScheduleDecision)
    assert decision.predicted_ttft_s == pytest.approx(100.0 + FROM_SCRATCH_S)


def test_predictive_admission_judges_the_load_when_the_prefill_ends():
    # 60 running, 120,000 context, 20 tokens left each: steps of 0.16 s; joining now gives
    # step(61, 121024) = 0.161524 > 0.1. The prefill ends at 3.2 s, after 20 steps: half the
    # batch has finished and the 30 survivors hold 60,000 + 30 * 20 = 60,600 tokens, so
    # step(31, 61624) = 0.087124 <= 0.1.
    busy = decode("d0", running=60, context=120_000, mean_remaining_tokens=20.0)
    view = cluster([prefill("p0", 3.2 - FROM_SCRATCH_S)], [busy])
    req = request(ttft_slo_s=30.0, tbt_slo_s=0.1)
    current = AdmissionControl(RoundRobinScheduler()).schedule(req, view)
    assert isinstance(current, Rejection)
    assert current.predicted_tbt_s == pytest.approx(0.161524)
    predictive = AdmissionControl(RoundRobinScheduler(), predictive=True).schedule(req, view)
    assert isinstance(predictive, ScheduleDecision)
    assert predictive.predicted_tbt_s == pytest.approx(0.01 + 0.0155 + 0.061624)
    # The conductor decides the same both ways.
    assert isinstance(CacheAwareScheduler().schedule(req, view), Rejection)
    assert isinstance(
        CacheAwareScheduler(predictive_rejection=True).schedule(req, view), ScheduleDecision
    )


@pytest.mark.parametrize(
    ("views", "req"),
    [
        # A store fetch: 48 blocks of 1 MB at 480 MB/s = 0.1 s + 0.0941376 beats recomputing.
        (([prefill("p0", 0.5)], [decode("d0")], 480e6), request(store_prefix_blocks=48)),
        (([prefill("p0", 0.5)], [decode("d0")], 480e6), request(ttft_slo_s=0.6)),
        ((PREFILLS, DECODES, 1e9), request(ttft_slo_s=0.45, tbt_slo_s=0.02)),
        ((PREFILLS, DECODES, 1e9), request(ttft_slo_s=1.0, tbt_slo_s=0.03)),
        (([prefill("p0")], [decode("d0", free=10)], 1e9), request()),
    ],
)
def test_the_rule_is_the_conductors(views, req):
    """Wrapping the conductor without its own rejection reproduces the conductor with it."""
    view = cluster(*views)
    wrapped = AdmissionControl(CacheAwareScheduler(enable_early_rejection=False)).schedule(
        req, view
    )
    conductor = CacheAwareScheduler().schedule(req, view)
    assert type(wrapped) is type(conductor)
    assert wrapped.predicted_ttft_s == pytest.approx(conductor.predicted_ttft_s)
    if conductor.predicted_tbt_s is None:
        assert wrapped.predicted_tbt_s is None
    else:
        assert wrapped.predicted_tbt_s == pytest.approx(conductor.predicted_tbt_s)
    if isinstance(conductor, ScheduleDecision):
        assert wrapped.fetch_from_store_blocks == conductor.fetch_from_store_blocks


def test_admission_check_reports_the_predictions():
    verdict = admission_check(
        request(store_block_bytes=2_000_000),
        prefill("p0", 0.25, cached_blocks=16),
        decode("d0", running=1, context=500),
        fetch_from_store_blocks=32,
        bandwidth_bytes_per_s=1e9,
    )
    # 0.25 queued + 32 blocks * 2 MB at 1 GB/s (0.064 s) + prefill(256, 768).
    assert verdict.predicted_ttft_s == pytest.approx(0.25 + 0.064 + WITH_PREFIX_S)
    assert verdict.predicted_tbt_s == pytest.approx(0.01 + 0.001 + 0.001524)
    assert verdict.has_room and verdict.reason is None


def test_built_from_config():
    policy = scheduling_policy_from_config(
        SchedulingConfig(policy="sglang_cache_aware", baseline_admission=True)
    )
    assert isinstance(policy, AdmissionControl) and policy.name == "sglang_cache_aware+admit"
    assert isinstance(policy.inner, SGLangCacheAwareRouter) and not policy.predictive
    predictive = scheduling_policy_from_config(
        SchedulingConfig(policy="dynamo_kv", baseline_admission=True, predictive_rejection=True)
    )
    assert predictive.name == "dynamo_kv+admit" and predictive.predictive
    # Off by default: a baseline admits everything.
    assert scheduling_policy_from_config(SchedulingConfig(policy="random")).name == "random"
    with pytest.raises(ValueError, match=r"scheduling\.baseline_admission: expected False for"):
        SchedulingConfig(policy="cache_aware", baseline_admission=True)
    with pytest.raises(ValueError, match=r"scheduling\.baseline_admission: expected a bool"):
        SchedulingConfig(policy="random", baseline_admission=1)
    with pytest.raises(ValueError, match=r"inner: expected a SchedulingPolicy"):
        AdmissionControl(policy)
