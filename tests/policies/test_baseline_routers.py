"""SGLang's and Dynamo's cache-aware routers over hand-built views, with numbers worked by hand.

Shared setup (costs in worked_costs.py): a 1,024-token prompt in 16-token blocks, i.e. 64
blocks, hashed as 64 chained ids; prefill costs 0.02 + 2e-4 * new + 1e-7 * new * (cached +
new / 2) seconds, decode steps 0.01 + 5e-4 * batch + 1e-6 * context seconds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from raycake.policies.baseline_routers import (
    ApproximatePrefixTree,
    DynamoKvRouter,
    SGLangCacheAwareRouter,
)
from raycake.policies.scheduling import (
    CacheAwareScheduler,
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    RequestView,
    ScheduleDecision,
    SchedulingConfig,
    scheduling_policy_from_config,
)
from tests.policies.worked_costs import COST, WITH_PREFIX_S

HOT = tuple(range(48))  # a hot 48-block (768-token) prefix


def prefill(instance_id: str, num_queued: int = 0, cached_blocks: int = 0, queued_s: float = 0.0):
    return PrefillInstanceView(instance_id, queued_s, num_queued, COST, cached_blocks)


def decode(instance_id: str, running: int = 0, context: int = 0) -> DecodeInstanceView:
    return DecodeInstanceView(instance_id, running, 64, context, 100_000, COST)


def request(hashes: tuple[int, ...], num_tokens: int = 1024, block_size: int = 16) -> RequestView:
    return RequestView("r", num_tokens, block_size, 128, prefix_hashes=hashes)


def with_suffix(prefix: tuple[int, ...], tag: int, num_blocks: int = 64) -> tuple[int, ...]:
    """``prefix`` then distinct ids up to ``num_blocks`` (chained hashes diverge after it)."""
    return prefix + tuple(10_000 * tag + j for j in range(num_blocks - len(prefix)))


def cluster(prefills, decodes=None) -> ClusterView:
    return ClusterView(list(prefills), decodes or [decode("d0")], 1e9)


# --- SGLang -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared_blocks", "expected", "rule"),
    [
        # 19 * 16 / 1024 = 0.297 <= 0.3: the smallest (empty) tree, p1.
        (19, "p1", "smallest_tree"),
        # 20 * 16 / 1024 = 0.3125 > 0.3: the instance whose tree holds the prefix.
        (20, "p0", "prefix_match"),
    ],
)
def test_sglang_follows_a_match_only_over_the_cache_threshold(shared_blocks, expected, rule):
    router = SGLangCacheAwareRouter()
    view = cluster([prefill("p0"), prefill("p1")])
    first = router.schedule(request(with_suffix((), 1)), view)
    assert first.prefill_instance_id == "p0"  # both trees empty: ties go to the first listed
    assert len(router.tree("p0")) == 64 and len(router.tree("p1")) == 0
    second = request(with_suffix(with_suffix((), 1, shared_blocks), 2))
    assert router.schedule(second, view).prefill_instance_id == expected
    assert router.route_counts == Counter(["smallest_tree", rule])


def test_sglang_match_ratio_exactly_at_the_threshold_is_not_a_match():
    # 160 tokens in 16-token blocks: 3 matched blocks are 48 / 160 = 0.3 exactly, not > 0.3.
    router = SGLangCacheAwareRouter()
    view = cluster([prefill("p0"), prefill("p1")])
    router.schedule(request((1, 2, 3, 4, 5, 6, 7, 8, 9, 10), num_tokens=160), view)
    at = router.schedule(request((1, 2, 3, 40, 50), num_tokens=160), view)
    assert at.prefill_instance_id == "p1"
    over = router.schedule(request((1, 2, 3, 4, 50), num_tokens=160), view)  # 64 / 160
    assert over.prefill_instance_id == "p0"


@pytest.mark.parametrize(
    ("loads", "expected", "rule"),
    [
        # max - min = 65 > 64 and 100 > 1.5 * 35 = 52.5: imbalanced, the shortest queue.
        ((100, 35, 50), "p1", "imbalance"),
        # max - min = 64, not > 64: balanced, so the prefix holder p0.
        ((99, 35, 50), "p0", "prefix_match"),
        # 202 - 134 = 68 > 64 and 202 > 1.5 * 134 = 201: imbalanced.
        ((202, 134, 150), "p1", "imbalance"),
        # 201 - 134 = 67 > 64 but 201 is not > 201: balanced.
        ((201, 134, 150), "p0", "prefix_match"),
        # A gap of 200 over an idle instance: imbalanced whatever the ratio (1.5 * 0 = 0).
        ((200, 0, 150), "p1", "imbalance"),
    ],
)
def test_sglang_falls_back_to_the_shortest_queue_when_imbalanced(loads, expected, rule):
    router = SGLangCacheAwareRouter()
    router.tree("p0").insert(with_suffix(HOT, 1))
    view = cluster([prefill(f"p{i}", num_queued=load) for i, load in enumerate(loads)])
    decision = router.schedule(request(with_suffix(HOT, 2)), view)
    assert decision.prefill_instance_id == expected
    assert router.route_counts == Counter({rule: 1})
    # The tree learns the request on both paths.
    assert router.tree(expected).match(with_suffix(HOT, 2)) == 64


def test_sglang_sends_unmatched_prompts_to_the_smallest_tree():
    router = SGLangCacheAwareRouter()
    for instance_id, size in (("p0", 64), ("p1", 32), ("p2", 48)):
        router.tree(instance_id).insert(tuple(range(1000 * size, 1000 * size + size)))
    view = cluster([prefill("p0"), prefill("p1", num_queued=5), prefill("p2")])
    decision = router.schedule(request(with_suffix((), 7)), view)
    assert decision.prefill_instance_id == "p1"  # 32 blocks: the most room, whatever its queue
    assert [len(router.tree(i)) for i in ("p0", "p1", "p2")] == [64, 96, 48]


def test_prefix_tree_evicts_least_recent_leaves_within_its_bound():
    tree = ApproximatePrefixTree(max_blocks=10)
    a, b, c = tuple(range(1, 9)), tuple(range(100, 106)), tuple(range(200, 204))
    tree.insert(a)
    tree.insert(b)  # 14 blocks: a's 4 deepest (the least recent leaves) go
    assert (len(tree), tree.match(a), tree.match(b)) == (10, 4, 6)
    tree.insert(a[:2])  # touch a's first two blocks
    tree.insert(c)  # 14 again: a's blocks 3-4, then b's two deepest
    assert (len(tree), tree.match(a), tree.match(b), tree.match(c)) == (10, 2, 4, 4)
    # Every block left is reachable from the root: 2 + 4 + 4 == 10, nothing stranded.
    with pytest.raises(ValueError, match=r"max_tree_blocks: expected an integer >= 1, got 0"):
        ApproximatePrefixTree(0)


def test_sglang_trees_stay_within_max_tree_blocks():
    router = SGLangCacheAwareRouter(max_tree_blocks=100)
    view = cluster([prefill("p0")])
    for tag in range(5):
        router.schedule(request(with_suffix(HOT, tag)), view)
    # 48 shared + 5 * 16 suffix blocks = 128 inserted; the bound keeps 100, newest intact.
    assert len(router.tree("p0")) == 100
    assert router.tree("p0").match(with_suffix(HOT, 4)) == 64


def test_sglang_decode_choice_and_honest_predictions():
    router = SGLangCacheAwareRouter()
    view = cluster(
        [prefill("p0", cached_blocks=48, queued_s=0.5)],
        [decode("d0", running=9, context=9000), decode("d1", running=3, context=30_000)],
    )
    decision = router.schedule(request(with_suffix(HOT, 1)), view)
    # Fewest running requests, although d1 holds more context.
    assert decision.decode_instance_id == "d1"
    # The real cache (48 blocks), not the router's empty tree, sets the predicted prefill.
    assert decision.predicted_prefill_s == pytest.approx(WITH_PREFIX_S)
    assert decision.predicted_ttft_s == pytest.approx(0.5 + WITH_PREFIX_S)
    assert decision.predicted_tbt_s == pytest.approx(0.01 + 5e-4 * 4 + 1e-6 * 31_024)
    assert decision.fetch_from_store_blocks == 0


def test_sglang_options_are_validated():
    with pytest.raises(ValueError, match=r"cache_threshold: expected a number in \[0, 1\]"):
        SGLangCacheAwareRouter(cache_threshold=1.5)
    with pytest.raises(ValueError, match=r"balance_abs_threshold: expected an integer >= 0"):
        SGLangCacheAwareRouter(balance_abs_threshold=-1)
    with pytest.raises(ValueError, match=r"balance_rel_threshold: expected a finite number"):
        SGLangCacheAwareRouter(balance_rel_threshold=0.5)


# --- Dynamo -----------------------------------------------------------------------------------


def test_dynamo_cost_is_weighted_prefill_blocks_plus_active_blocks():
    router = DynamoKvRouter()
    req = request(with_suffix(HOT, 1))
    # p0 holds the 48-block prefix: 1 * (1024 - 768) / 16 + (0 + 64) = 80.
    assert router.prefill_cost(req, prefill("p0", cached_blocks=48)) == 80.0
    # p1 holds nothing: 1 * 64 + 64 = 128.
    assert router.prefill_cost(req, prefill("p1")) == 128.0
    heavy = DynamoKvRouter(overlap_score_weight=2.0)
    assert heavy.prefill_cost(req, prefill("p0", cached_blocks=48)) == 2 * 16 + 64
    assert heavy.prefill_cost(req, prefill("p1")) == 2 * 64 + 64
    # Decode: blocks in use, ceil(8000 / 16) = 500 and ceil(4001 / 16) = 251, plus 64.
    assert router.decode_cost(req, decode("d0", running=4, context=8000)) == 564.0
    assert router.decode_cost(req, decode("d1", running=9, context=4001)) == 315.0
    decision = router.schedule(
        req,
        cluster(
            [prefill("p0", cached_blocks=48), prefill("p1")],
            [decode("d0", running=4, context=8000), decode("d1", running=9, context=4001)],
        ),
    )
    assert (decision.prefill_instance_id, decision.decode_instance_id) == ("p0", "d1")
    assert decision.predicted_ttft_s == pytest.approx(WITH_PREFIX_S)
    assert decision.predicted_tbt_s == pytest.approx(0.01 + 5e-4 * 10 + 1e-6 * 5025)


def test_dynamo_counts_the_blocks_of_prefills_still_queued():
    router = DynamoKvRouter()
    first = request(with_suffix(HOT, 1))
    assert router.schedule(first, cluster([prefill("p0", cached_blocks=48)]))
    # One of its requests still queued on p0: a prompt sharing the 48 hot blocks adds only its
    # 16 own blocks to the 64 held: 16 + 64 + 16 = 96.
    shares = request(with_suffix(HOT, 2))
    assert router.prefill_cost(shares, prefill("p0", num_queued=1, cached_blocks=48)) == 96.0
    # An unrelated prompt adds all 64: 64 + 64 + 64 = 192.
    unrelated = request(with_suffix((), 3))
    assert router.prefill_cost(unrelated, prefill("p0", num_queued=1)) == 192.0
    # Once the queue is empty the books drop it: back to 16 + 64.
    assert router.prefill_cost(shares, prefill("p0", num_queued=0, cached_blocks=48)) == 80.0
    # Queued requests the router never saw are sized like the request: 2 * 64 + 64 + 64.
    assert router.prefill_cost(unrelated, prefill("p9", num_queued=2)) == 256.0


def test_dynamo_breaks_ties_at_random_reproducibly():
    view = cluster([prefill(f"p{i}") for i in range(3)], [decode("d0"), decode("d1")])

    def picks(seed: int) -> list[tuple[str, str]]:
        router = DynamoKvRouter(seed=seed)
        decisions = [router.schedule(request(with_suffix((), i)), view) for i in range(30)]
        return [(d.prefill_instance_id, d.decode_instance_id) for d in decisions]

    assert picks(3) == picks(3) and picks(3) != picks(4)
    assert {p for p, _ in picks(3)} == {"p0", "p1", "p2"}
    assert {d for _, d in picks(3)} == {"d0", "d1"}
    # A lower cost is never left to chance: p1 holds 1 block of the prompt (127 vs 128).
    lopsided = cluster([prefill("p0"), prefill("p1", cached_blocks=1), prefill("p2")])
    router = DynamoKvRouter(seed=3)
    chosen = {router.schedule(request(with_suffix((), 1)), lopsided).prefill_instance_id}
    assert chosen == {"p1"}
    with pytest.raises(ValueError, match=r"overlap_score_weight: expected a finite number >= 0"):
        DynamoKvRouter(overlap_score_weight=-1.0)


# --- Both -------------------------------------------------------------------------------------


def _stream(policy, num_requests: int) -> tuple[list[str], list[int]]:
    """Requests sharing the hot prefix, arriving faster than any prefill finishes: each joins
    its instance's queue. Only p0 holds the prefix in its real cache."""
    view = cluster([prefill(f"p{i}", cached_blocks=48 if i == 0 else 0) for i in range(4)])
    chosen = []
    for tag in range(num_requests):
        decision = policy.schedule(request(with_suffix(HOT, tag)), view)
        assert isinstance(decision, ScheduleDecision)
        chosen.append(decision.prefill_instance_id)
        view = dataclasses.replace(
            view,
            prefill=[
                dataclasses.replace(
                    p,
                    num_queued=p.num_queued + 1,
                    queued_prefill_seconds=p.queued_prefill_seconds + decision.predicted_prefill_s,
                )
                if p.instance_id == decision.prefill_instance_id
                else p
                for p in view.prefill
            ],
        )
    return chosen, [p.num_queued for p in view.prefill]


def test_hot_prefix_herding_per_router():
    # SGLang: the first request finds every tree empty (p0, first listed); every later one
    # matches 48 / 64 blocks (0.75 > 0.3) and follows it until p0's queue is 65 requests over
    # the idle ones. From then on the imbalance rule and the prefix rule take turns: p0 stays
    # 64 requests ahead, holding 98 of 200.
    sglang = SGLangCacheAwareRouter()
    chosen, queues = _stream(sglang, 200)
    assert chosen[:65] == ["p0"] * 65 and chosen[65:69] == ["p1", "p2", "p3", "p0"]
    assert queues == [98, 34, 34, 34]
    assert sglang.route_counts == Counter(
        {"smallest_tree": 1, "prefix_match": 97, "imbalance": 102}
    )
    # Dynamo: each queued request counts as load. With k queued, p0 costs 16 + (48 + 16k) +
    # 16 = 80 + 16k; another instance with j >= 1 queued (the hot blocks in its books too)
    # costs 64 + (48 + 16j) + 16 = 128 + 16j. So p0 takes the first three (80, 96, 112 < 128)
    # and then stays three ahead (four after a tie at k = j + 3 falls its way).
    dynamo = DynamoKvRouter()
    chosen, queues = _stream(dynamo, 200)
    assert chosen[:3] == ["p0"] * 3
    assert queues == [53, 49, 49, 49]
    # Mooncake's conductor (local caches only) weighs queued seconds against the saving: p0
    # takes two (0.094 s queued + 0.094 < 0.277 from scratch), p1 computes the prefix once,
    # and from then on each instance counts the prefix its queue will leave cached: an even
    # spread. Without those books p1..p3 recompute it for every request and p0 takes half.
    chosen, queues = _stream(CacheAwareScheduler(use_store=False), 200)
    assert chosen[:6] == ["p0", "p0", "p1", "p2", "p3", "p0"]
    assert queues == [51, 50, 50, 49]
    blind = CacheAwareScheduler(use_store=False, count_queued_prefixes=False)
    assert _stream(blind, 200)[1] == [100, 34, 33, 33]


def test_built_from_config():
    router = scheduling_policy_from_config(SchedulingConfig(policy="sglang_cache_aware"))
    assert isinstance(router, SGLangCacheAwareRouter) and router.cache_threshold == 0.3
    assert (router.balance_abs_threshold, router.balance_rel_threshold) == (64, 1.5)
    dynamo = scheduling_policy_from_config(SchedulingConfig(policy="dynamo_kv", seed=5))
    assert isinstance(dynamo, DynamoKvRouter) and dynamo.overlap_score_weight == 1.0


def test_request_prefix_hashes_are_validated():
    assert request((), num_tokens=1000).prefix_hashes == ()
    # ceil(1000 / 16) = 63 = num_prompt_blocks (62) + 1: a trace's hash of the partial block.
    assert len(request(tuple(range(63)), num_tokens=1000).prefix_hashes) == 63
    with pytest.raises(ValueError, match=r"prefix_hashes: expected at most num_prompt_blocks"):
        request(tuple(range(64)), num_tokens=1000)
    with pytest.raises(ValueError, match=r"prefix_hashes: expected a tuple of integers"):
        request([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prefix_hashes: expected a tuple of integers"):
        request((1, "2"))  # type: ignore[arg-type]
