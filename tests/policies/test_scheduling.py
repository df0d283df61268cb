"""The conductor's scheduling policies over hand-built cluster views, with numbers worked by hand.

Shared setup: a 1,024-token prompt in 16-token blocks (63 blocks reusable: the last token is
always computed). Prefill costs 0.02 + 2e-4 * new + 1e-7 * new * (cached + new / 2) seconds:
    from scratch:                 prefill(1024, 0)   = 0.02 + 0.2048 + 0.0524288 = 0.2772288
    after a 48-block (768) prefix: prefill(256, 768) = 0.02 + 0.0512 + 0.0229376 = 0.0941376
so holding the 48-block prefix saves 0.1830912 s. Decode steps cost
0.01 + 5e-4 * batch + 1e-6 * context seconds.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import Counter

import pytest

from raycake.policies.scheduling import (
    SCHEDULING_POLICIES,
    CacheAwareScheduler,
    ClusterView,
    DecodeInstanceView,
    LeastLoadedScheduler,
    PrefillInstanceView,
    RandomScheduler,
    Rejection,
    RequestView,
    RoundRobinScheduler,
    ScheduleDecision,
    SchedulingConfig,
    SchedulingPolicy,
    make_scheduling_policy,
    predict_decode_load,
    scheduling_policy_from_config,
)
from tests.policies.worked_costs import COST, FROM_SCRATCH_S, WITH_PREFIX_S

BLOCK_BYTES = 1_000_000


def prefill(instance_id: str, queued_s: float = 0.0, cached_blocks: int = 0) -> PrefillInstanceView:
    return PrefillInstanceView(instance_id, queued_s, int(queued_s > 0), COST, cached_blocks)


def decode(instance_id: str, running: int = 0, context: int = 0, free: int = 1000, **kw):
    return DecodeInstanceView(
        instance_id, running, kw.pop("max_num_seqs", 64), context, free, COST, **kw
    )


def request(**kw) -> RequestView:
    fields = {"request_id": "r", "num_prompt_tokens": 1024, "block_size": 16, "max_tokens": 128}
    fields.update(store_block_bytes=BLOCK_BYTES)
    return RequestView(**{**fields, **kw})


def cluster(prefills, decodes=None, bandwidth: float = 1e9) -> ClusterView:
    return ClusterView(list(prefills), decodes or [decode("d0")], bandwidth)


def test_request_block_arithmetic():
    req = request(num_prompt_tokens=1024, max_tokens=129)
    assert req.num_prompt_blocks == 64
    assert req.num_reusable_prefix_blocks == 63  # the last token is always computed
    assert req.num_kv_blocks_needed == 73  # ceil(1153 / 16)


def test_round_robin_cycles_through_both_lists():
    policy = RoundRobinScheduler()
    view = cluster([prefill(f"p{i}") for i in range(3)], [decode("d0"), decode("d1")])
    pairs = [policy.schedule(request(), view) for _ in range(4)]
    assert [(d.prefill_instance_id, d.decode_instance_id) for d in pairs] == [
        ("p0", "d0"),
        ("p1", "d1"),
        ("p2", "d0"),
        ("p0", "d1"),
    ]


def test_least_loaded_picks_the_emptiest_instances():
    view = cluster(
        [prefill("p0", 0.3), prefill("p1", 0.1), prefill("p2", 0.2)],
        [
            decode("d0", running=32),
            decode("d1", running=16, max_num_seqs=16),
            decode("d2", running=8),
        ],
    )
    decision = LeastLoadedScheduler().schedule(request(), view)
    assert (decision.prefill_instance_id, decision.decode_instance_id) == ("p1", "d2")
    assert decision.predicted_ttft_s == pytest.approx(0.1 + FROM_SCRATCH_S)
    # step(9, 0 + 1024) = 0.01 + 0.0045 + 0.001024
    assert decision.predicted_tbt_s == pytest.approx(0.015524)
    assert decision.fetch_from_store_blocks == 0


def test_random_is_deterministic_for_a_seed():
    view = cluster([prefill(f"p{i}") for i in range(4)], [decode(f"d{i}") for i in range(4)])

    def picks(seed: int) -> list[tuple[str, str]]:
        policy = RandomScheduler(seed)
        decisions = [policy.schedule(request(), view) for _ in range(20)]
        return [(d.prefill_instance_id, d.decode_instance_id) for d in decisions]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert len({prefill_id for prefill_id, _ in picks(7)}) > 1


def test_cache_aware_prefers_the_prefix_holder_when_queues_are_equal():
    view = cluster([prefill("p0"), prefill("p1", cached_blocks=48), prefill("p2")])
    decision = CacheAwareScheduler(use_store=False).schedule(request(), view)
    assert decision.prefill_instance_id == "p1"
    assert decision.predicted_ttft_s == pytest.approx(WITH_PREFIX_S)
    assert decision.predicted_prefill_s == pytest.approx(WITH_PREFIX_S)


@pytest.mark.parametrize(
    ("holder_queue_s", "expected", "expected_ttft_s"),
    [
        # 0.15 + 0.0941376 = 0.2441376 < 0.2772288: waiting for the holder still pays.
        (0.15, "holder", 0.15 + WITH_PREFIX_S),
        # 0.20 + 0.0941376 = 0.2941376 > 0.2772288: the queue exceeds the 0.183 s saving.
        (0.20, "idle", FROM_SCRATCH_S),
    ],
)
def test_cache_aware_weighs_the_holders_queue_against_the_saving(
    holder_queue_s, expected, expected_ttft_s
):
    view = cluster([prefill("holder", holder_queue_s, cached_blocks=48), prefill("idle")])
    decision = CacheAwareScheduler(use_store=False).schedule(request(), view)
    assert decision.prefill_instance_id == expected
    assert decision.predicted_ttft_s == pytest.approx(expected_ttft_s)


@pytest.mark.parametrize(
    ("bandwidth", "fetch_blocks", "expected_ttft_s"),
    [
        # 48 blocks * 1 MB at 480 MB/s = 0.1 s; 0.1 + 0.0941376 beats recomputing (0.2772288).
        (480e6, 48, 0.1 + WITH_PREFIX_S),
        # At 160 MB/s the fetch takes 0.3 s: recomputing is faster.
        (160e6, 0, FROM_SCRATCH_S),
    ],
)
def test_store_fetch_only_when_faster_than_recompute(bandwidth, fetch_blocks, expected_ttft_s):
    view = cluster([prefill("p0")], bandwidth=bandwidth)
    decision = CacheAwareScheduler().schedule(request(store_prefix_blocks=48), view)
    assert decision.fetch_from_store_blocks == fetch_blocks
    assert decision.predicted_ttft_s == pytest.approx(expected_ttft_s)


def test_balance_threshold_gates_fetches_of_a_slightly_longer_prefix():
    # Local 40 blocks (640 tokens) vs. store 48: recompute prefill(384, 640) =
    # 0.02 + 0.0768 + 1e-7 * 384 * 832 = 0.1287488, or fetch 8 blocks (8 MB at 480 MB/s =
    # 1/60 s) then prefill(256, 768): 0.0166667 + 0.0941376 = 0.1108043.
    view = cluster([prefill("p0", cached_blocks=40)], bandwidth=480e6)
    req = request(store_prefix_blocks=48)
    eager = CacheAwareScheduler(balance_threshold=1.0).schedule(req, view)
    assert eager.fetch_from_store_blocks == 8
    assert eager.predicted_ttft_s == pytest.approx(8e6 / 480e6 + WITH_PREFIX_S)
    # 48 / 40 = 1.2 is under a threshold of 1.5: not worth a transfer.
    damped = CacheAwareScheduler(balance_threshold=1.5).schedule(req, view)
    assert damped.fetch_from_store_blocks == 0
    assert damped.predicted_ttft_s == pytest.approx(0.02 + 0.0768 + 1e-7 * 384 * 832)


def test_decode_choice_respects_free_blocks_slots_and_tbt():
    # The request needs ceil((1024 + 128) / 16) = 72 blocks.
    d_small = decode("small", free=71)  # idle but short of memory
    d_full = decode("full", running=8, context=8000, max_num_seqs=8)  # no batch slot
    d_busy = decode("busy", running=40, context=80000)  # step(41, 81024) = 0.111524
    d_light = decode("light", running=10, context=20000)  # step(11, 21024) = 0.036524
    view = cluster([prefill("p0")], [d_small, d_full, d_busy, d_light])
    decision = CacheAwareScheduler().schedule(request(), view)
    assert decision.decode_instance_id == "light"
    assert decision.predicted_tbt_s == pytest.approx(0.01 + 0.0055 + 0.021024)
    without_light = cluster([prefill("p0")], [d_small, d_full, d_busy])
    decision = CacheAwareScheduler().schedule(request(), without_light)
    assert decision.decode_instance_id == "busy"
    assert decision.predicted_tbt_s == pytest.approx(0.01 + 0.0205 + 0.081024)


def test_early_rejection_names_the_slo_and_the_numbers():
    view = cluster([prefill("p0", 0.5)], [decode("d0", running=10, context=20000)])
    policy = CacheAwareScheduler()
    # TTFT 0.5 + 0.2772288 = 0.7772 > 0.5; TBT 0.036524 > 0.03.
    rejection = policy.schedule(request(ttft_slo_s=0.5, tbt_slo_s=0.03), view)
    assert isinstance(rejection, Rejection)
    assert "TTFT SLO: predicted TTFT 0.7772 s on 'p0' > ttft_slo_s 0.5 s" in rejection.reason
    assert "TBT SLO: predicted TBT 0.03652 s on 'd0' > tbt_slo_s 0.03 s" in rejection.reason
    assert rejection.predicted_ttft_s == pytest.approx(0.5 + FROM_SCRATCH_S)
    assert rejection.predicted_tbt_s == pytest.approx(0.036524)
    # Within both SLOs: admitted.
    assert isinstance(
        policy.schedule(request(ttft_slo_s=1.0, tbt_slo_s=0.05), view), ScheduleDecision
    )


def test_rejection_when_no_decode_instance_has_room():
    view = cluster([prefill("p0")], [decode("d0", free=50), decode("d1", free=60)])
    rejection = CacheAwareScheduler().schedule(request(), view)
    assert isinstance(rejection, Rejection) and rejection.predicted_tbt_s is None
    assert "no decode instance has a free batch slot and 72 free KV blocks" in rejection.reason
    assert "(most free: 60 on 'd1')" in rejection.reason


def test_without_early_rejection_every_request_is_placed():
    view = cluster([prefill("p0", 5.0)], [decode("d0", free=50), decode("d1", running=3, free=60)])
    decision = CacheAwareScheduler(enable_early_rejection=False).schedule(
        request(ttft_slo_s=1.0, tbt_slo_s=0.001), view
    )
    # No room anywhere: the lowest predicted TBT, step(1, 1024), waits for memory on d0.
    assert isinstance(decision, ScheduleDecision) and decision.decode_instance_id == "d0"


def test_predictive_rejection_admits_what_will_have_drained():
    # 60 running, 120,000 context tokens, 20 tokens left on average: a step takes
    # 0.01 + 0.03 + 0.12 = 0.16 s and joining now would give step(61, 121024) = 0.161524 > 0.1.
    busy = decode("d0", running=60, context=120_000, mean_remaining_tokens=20.0)
    # The prefill ends at 3.2 s: 20 steps, so 20 / 40 = half the batch has finished; the 30
    # survivors hold 60,000 + 30 * 20 = 60,600 tokens: step(31, 61624) = 0.087124 < 0.1.
    view = cluster([prefill("p0", 3.2 - FROM_SCRATCH_S)], [busy])
    req = request(ttft_slo_s=30.0, tbt_slo_s=0.1)
    current = CacheAwareScheduler().schedule(req, view)
    assert isinstance(current, Rejection) and "tbt_slo_s 0.1 s" in current.reason
    assert current.predicted_tbt_s == pytest.approx(0.161524)
    predictive = CacheAwareScheduler(predictive_rejection=True).schedule(req, view)
    assert isinstance(predictive, ScheduleDecision)
    assert predictive.predicted_tbt_s == pytest.approx(0.01 + 0.0155 + 0.061624)
    load = predict_decode_load(busy, 3.2)
    assert (load.num_running, load.total_context_tokens) == pytest.approx((30.0, 60_600.0))
    # Unknown remaining lengths: no drain is assumed.
    unknown = dataclasses.replace(busy, mean_remaining_tokens=None)
    assert predict_decode_load(unknown, 3.2) == predict_decode_load(busy, 0.0)
    assert predict_decode_load(busy, 100.0).num_running == 0.0  # fully drained


def _burst(policy: CacheAwareScheduler, req: RequestView, view: ClusterView, num_requests: int):
    """A burst sharing one prefix, all arriving before any finishes: each decision's work joins
    its instance's queue, and an instance that fetched the prefix holds it afterwards. What an
    instance computes itself is not added to its cache, so without the store the first holder
    stays the only one: the case where herding onto it would be most tempting."""
    chosen = []
    for _ in range(num_requests):
        decision = policy.schedule(req, view)
        assert isinstance(decision, ScheduleDecision)
        chosen.append((decision.prefill_instance_id, decision.fetch_from_store_blocks))
        view = dataclasses.replace(
            view,
            prefill=[
                dataclasses.replace(
                    p,
                    queued_prefill_seconds=p.queued_prefill_seconds + decision.predicted_prefill_s,
                    cached_prefix_blocks=max(
                        p.cached_prefix_blocks, decision.fetch_from_store_blocks
                    ),
                )
                if p.instance_id == decision.prefill_instance_id
                else p
                for p in view.prefill
            ],
        )
    return chosen, view


def test_cache_aware_does_not_herd_a_shared_prefix_onto_its_holder():
    view = cluster([prefill("p0", cached_blocks=48), prefill("p1"), prefill("p2"), prefill("p3")])
    chosen, final = _burst(CacheAwareScheduler(use_store=False), request(), view, 40)
    # The holder takes requests while its queue is under the 0.183 s saving: after two
    # (queue 0.188) waiting for it costs more than computing the prefix elsewhere.
    assert [instance for instance, _ in chosen[:3]] == ["p0", "p0", "p1"]
    counts = Counter(instance for instance, _ in chosen)
    assert set(counts) == {"p0", "p1", "p2", "p3"} and counts["p0"] < 0.6 * len(chosen)
    # Queues end balanced to within one from-scratch prefill, not piled on the holder.
    queues = [p.queued_prefill_seconds for p in final.prefill]
    assert max(queues) - min(queues) <= FROM_SCRATCH_S + 1e-9


def test_hot_prefix_gets_replicated_through_the_store():
    # 48 blocks at 1 GB/s take 0.048 s: a non-holder fetches (0.1421376 s of work) rather
    # than recompute (0.2772288 s), and then holds the prefix itself.
    view = cluster([prefill("p0", cached_blocks=48), prefill("p1"), prefill("p2"), prefill("p3")])
    chosen, final = _burst(CacheAwareScheduler(), request(store_prefix_blocks=48), view, 20)
    assert chosen[:2] == [("p0", 0), ("p1", 48)]  # p0's queue (0.094) + 0.094 > 0.142
    fetched_by = {instance for instance, blocks in chosen if blocks > 0}
    assert fetched_by == {"p1", "p2", "p3"}  # each fetched once, then reused its replica
    assert sum(1 for _, blocks in chosen if blocks > 0) == 3
    assert all(p.cached_prefix_blocks == 48 for p in final.prefill)
    assert max(Counter(instance for instance, _ in chosen).values()) <= 6


def test_prefixes_queued_on_an_instance_count_as_cached_there():
    # A session's first turn (64 blocks, hashes 0..63) is still queued on p1; its follow-up
    # shares the first 48 blocks, which p1 will hold when the follow-up starts there. With
    # 0.3 s queued on p1: 0.3 + 0.0941376 > 0.2772288 from scratch on idle p0, so p0; with
    # 0.1 s queued: 0.1 + 0.0941376 wins on p1.
    first = request(prefix_hashes=tuple(range(64)))
    follow_up = request(prefix_hashes=tuple(range(48)) + tuple(range(100, 116)))
    for queue_s, expected, ttft_s in (
        (0.3, "p0", FROM_SCRATCH_S),
        (0.1, "p1", 0.1 + WITH_PREFIX_S),
    ):
        policy = CacheAwareScheduler(use_store=False)
        routed = policy.schedule(first, cluster([prefill("p1")]))
        assert routed.prefill_instance_id == "p1"
        view = cluster([prefill("p0"), prefill("p1", queue_s)])  # p1: num_queued 1
        decision = policy.schedule(follow_up, view)
        assert decision.prefill_instance_id == expected
        assert decision.predicted_ttft_s == pytest.approx(ttft_s)
    # Once p1 reports an empty queue the books forget the first turn (its blocks are in
    # cached_prefix_blocks by then, if not evicted).
    policy = CacheAwareScheduler(use_store=False)
    policy.schedule(first, cluster([prefill("p1")]))
    idle = cluster([prefill("p0"), prefill("p1")])
    assert policy.schedule(follow_up, idle).prefill_instance_id == "p0"  # a tie: first listed
    blind = CacheAwareScheduler(use_store=False, count_queued_prefixes=False)
    blind.schedule(first, cluster([prefill("p1")]))
    view = cluster([prefill("p0"), prefill("p1", 0.1)])
    assert blind.schedule(follow_up, view).prefill_instance_id == "p0"


def test_views_are_validated_and_left_unchanged():
    with pytest.raises(
        ValueError, match=r"cluster.prefill: expected at least one prefill instance"
    ):
        ClusterView([], [decode("d0")], 1e9)
    with pytest.raises(ValueError, match=r"cluster.decode: expected at least one decode instance"):
        ClusterView([prefill("p0")], [], 1e9)
    with pytest.raises(ValueError, match=r"cluster.prefill: expected unique instance ids"):
        ClusterView([prefill("p0"), prefill("p0")], [decode("d0")], 1e9)
    with pytest.raises(ValueError, match=r"prefill instance 'p0'.queued_prefill_seconds"):
        prefill("p0", -1.0)
    with pytest.raises(ValueError, match=r"request 'r'.tbt_slo_s: expected a finite number > 0"):
        request(tbt_slo_s=0.0)
    view = cluster([prefill("p0", 0.1, cached_blocks=8)], [decode("d0", running=3, context=900)])
    snapshot = dataclasses.replace(view, prefill=list(view.prefill), decode=list(view.decode))
    for name in SCHEDULING_POLICIES:
        make_scheduling_policy(name).schedule(request(store_prefix_blocks=48), view)
    assert view == snapshot


def test_policies_are_chosen_by_name():
    assert set(SCHEDULING_POLICIES) == {
        "random",
        "round_robin",
        "least_loaded",
        "cache_aware",
        "sglang_cache_aware",
        "dynamo_kv",
    }
    for name in SCHEDULING_POLICIES:
        policy = make_scheduling_policy(name)
        assert isinstance(policy, SchedulingPolicy) and policy.name == name
    with pytest.raises(ValueError, match=r"scheduling_policy: expected one of \['cache_aware'"):
        make_scheduling_policy("fastest")
    with pytest.raises(ValueError, match=r"balance_threshold: expected a finite number >= 1.0"):
        make_scheduling_policy("cache_aware", balance_threshold=0.5)
    policy = scheduling_policy_from_config(
        SchedulingConfig(predictive_rejection=True, balance_threshold=2.0)
    )
    assert isinstance(policy, CacheAwareScheduler)
    assert policy.predictive_rejection and policy.balance_threshold == 2.0
    assert isinstance(
        scheduling_policy_from_config(SchedulingConfig(policy="random")), RandomScheduler
    )
    with pytest.raises(ValueError, match=r"scheduling.policy: expected one of"):
        SchedulingConfig(policy="fastest")
    with pytest.raises(ValueError, match=r"scheduling.ttft_slo_s: expected a finite number > 0"):
        SchedulingConfig(ttft_slo_s=-1.0)


def test_policies_import_without_torch_ray_or_numpy():
    code = (
        "import sys\n"
        "sys.modules.update(torch=None, ray=None, numpy=None)\n"
        "import raycake.policies.step_cost_model, raycake.policies.scheduling\n"
        "import raycake.policies.baseline_routers, raycake.policies.estimates\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
