"""Peers' cache-aware routers as scheduling policies: the baselines for Mooncake's conductor.

``SGLangCacheAwareRouter`` is SGLang's router (sgl-router, ``cache_aware`` policy) and
``DynamoKvRouter`` is NVIDIA Dynamo's KV router, each reduced to its decision rule over raycake's
plain views and driven, like every policy, by both the conductor and the trace simulator. Neither
has admission control or a global KV store: they never reject and never fetch from the store,
and their predictions (``decide_without_store``) are what the chosen pair will really cost, so the
simulator can compare them with the policies that do plan. ``AdmissionControl``
(``admission_control.py``) adds the conductor's rejection rule to them.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    RequestView,
    ScheduleDecision,
)
from raycake.policies.estimates import QueuedPrefixBooks, decide_without_store
from raycake.validation import require

# sgl-router's max_tree_size is 67,108,864 characters per worker; at about 4 characters per token
# that is 16.8M tokens, i.e. 32,768 blocks of 512 tokens (Mooncake's trace block).
DEFAULT_MAX_TREE_BLOCKS = 32_768


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ApproximatePrefixTree:
    """What a router believes one instance caches: the chained block hashes of the requests it
    sent there, not the instance's real cache, bounded to ``max_blocks`` by LRU leaf eviction.

    With chained hashes a block's hash names its whole prefix, so the radix tree is a set of
    hashes and a prompt's match is its longest leading run of hashes in the set. Inserting
    touches a path deepest-first, so every node stays more recent than its descendants and
    evicting the least recent node always removes a leaf (never strands a subtree).
    NOTE: SGLang evicts in the background every ``eviction_interval_secs`` (120 s), so its
    trees overshoot the bound between sweeps; this one evicts on insert and never does.
    """

    def __init__(self, max_blocks: int) -> None:
        require(
            isinstance(max_blocks, int) and not isinstance(max_blocks, bool) and max_blocks >= 1,
            "max_tree_blocks",
            "an integer >= 1",
            max_blocks,
        )
        self.max_blocks = max_blocks
        self._last_use: OrderedDict[int, None] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._last_use)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` in the tree."""
        num_matched = 0
        for h in hashes:
            if h not in self._last_use:
                break
            num_matched += 1
        return num_matched

    def insert(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):
            self._last_use[h] = None
            self._last_use.move_to_end(h)
        while len(self._last_use) > self.max_blocks:
            self._last_use.popitem(last=False)


class SGLangCacheAwareRouter:
    """SGLang's cache-aware router (sgl-router, ``--policy cache_aware``) over raycake's views.

    Source: sgl-project/sglang, ``sgl-router/src/policies/cache_aware.rs`` (header comment and
    ``select_worker``), defaults as sgl-router prints them at start-up in prefill/decode mode:
    ``CacheAware { cache_threshold: 0.3, balance_abs_threshold: 64, balance_rel_threshold: 1.5,
    eviction_interval_secs: 120, max_tree_size: 67108864 }`` (older READMEs list 0.5).

    Prefill instance, per request:
    1. The load is imbalanced when both ``max - min > balance_abs_threshold`` and
       ``max > balance_rel_threshold * min`` (``num_queued``, as sgl-router counts a worker's
       requests in flight): then the shortest queue.
    2. Otherwise the instance whose approximate tree matches the longest prefix, if that match
       covers more than ``cache_threshold`` of the prompt's tokens (sgl-router: of its
       characters); else the instance with the smallest tree ("most available cache").
    3. The prompt's hashes go into the chosen instance's tree on both paths.
    Ties go to the first listed instance (sgl-router takes whichever tenant its map yields
    first: arbitrary but fixed, which concentrates a hot prefix just the same).

    The trees are the router's belief, built from ``request.prefix_hashes``; the real cache
    (``cached_prefix_blocks``) only enters the predicted TTFT. Decode instance: the fewest
    running requests (ties: first listed); sgl-router has no disaggregation-aware decode choice
    of its own and uses least load there (``select_worker_pair``). No admission control, no
    global store: never rejects, never fetches.
    """

    name = "sglang_cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        max_tree_blocks: int = DEFAULT_MAX_TREE_BLOCKS,
    ) -> None:
        require(
            _is_number(cache_threshold) and 0.0 <= cache_threshold <= 1.0,
            "cache_threshold",
            "a number in [0, 1]",
            cache_threshold,
        )
        require(
            isinstance(balance_abs_threshold, int)
            and not isinstance(balance_abs_threshold, bool)
            and balance_abs_threshold >= 0,
            "balance_abs_threshold",
            "an integer >= 0",
            balance_abs_threshold,
        )
        require(
            _is_number(balance_rel_threshold) and balance_rel_threshold >= 1.0,
            "balance_rel_threshold",
            "a finite number >= 1.0",
            balance_rel_threshold,
        )
        ApproximatePrefixTree(max_tree_blocks)  # validates the bound before any request
        self.cache_threshold = float(cache_threshold)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = float(balance_rel_threshold)
        self.max_tree_blocks = max_tree_blocks
        self._trees: dict[str, ApproximatePrefixTree] = {}
        # Which rule placed each request: "imbalance", "prefix_match" or "smallest_tree".
        self.route_counts: Counter[str] = Counter()

    def tree(self, instance_id: str) -> ApproximatePrefixTree:
        """The router's tree for one prefill instance (empty until it routes there)."""
        if instance_id not in self._trees:
            self._trees[instance_id] = ApproximatePrefixTree(self.max_tree_blocks)
        return self._trees[instance_id]

    def is_imbalanced(self, loads: Sequence[int]) -> bool:
        low, high = min(loads), max(loads)
        return high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low

    def choose_prefill(self, request: RequestView, cluster: ClusterView) -> PrefillInstanceView:
        """The prefill instance by sgl-router's rule; records the request in its tree."""
        instances = cluster.prefill
        trees = [self.tree(p.instance_id) for p in instances]
        if self.is_imbalanced([p.num_queued for p in instances]):
            rule = "imbalance"
            index = min(range(len(instances)), key=lambda i: instances[i].num_queued)
        else:
            matches = [tree.match(request.prefix_hashes) for tree in trees]
            best = max(range(len(instances)), key=lambda i: matches[i])
            matched_tokens = min(matches[best] * request.block_size, request.num_prompt_tokens)
            if matched_tokens / request.num_prompt_tokens > self.cache_threshold:
                rule, index = "prefix_match", best
            else:
                rule = "smallest_tree"
                index = min(range(len(instances)), key=lambda i: len(trees[i]))
        trees[index].insert(request.prefix_hashes)
        self.route_counts[rule] += 1
        return instances[index]

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision:
        prefill = self.choose_prefill(request, cluster)
        decode = min(cluster.decode, key=lambda d: d.num_running)
        return decide_without_store(request, cluster, prefill, decode)


class DynamoKvRouter:
    """NVIDIA Dynamo's KV-aware router (``--router-mode kv``) over raycake's views.

    Source: Dynamo's router docs (docs.nvidia.com/dynamo, "Routing Concepts" and "Router
    Design"): ``cost = overlap_score_weight * prefill_blocks + decode_blocks``, lowest wins;
    prefill blocks = (input tokens - overlap blocks * block size) / block size, the request's
    blocks still to compute on that worker; decode blocks = "potential active blocks", those in
    use there plus the request's own. ``--router-kv-overlap-score-weight`` defaults to 1.0
    (frontend configuration reference). At temperature 0 ties go to the smaller cache tree,
    then at random; the views carry no tree sizes, so here ties go at random (seeded).

    Disaggregated, Dynamo routes twice ("Disaggregated Serving"): the decode stage turns overlap
    scoring off (weight 0), so a decode instance is the one with the fewest blocks in use. On
    the prefill instances, this router counts as "in use" the KV blocks held by the prefills
    queued there; the views give only how many are queued (``num_queued``), so the router keeps
    its own books, as Dynamo does: the prompts it sent to each instance, of which the newest
    ``num_queued`` are still there (prefill is first come, first served). A block shared by
    several queued prompts counts once (Dynamo's default ``--router-assume-kv-reuse``).
    NOTE: current Dynamo's prefill stage instead counts prompt tokens still to prefill and
    turns block tracking off; with weight 1 the two differ only in whether queued prompts'
    cached blocks count as load.

    Decode blocks in use = ceil(total_context_tokens / block_size): the blocks the contexts of
    its running and assigned requests fill, as the conductor reports them. Overlap =
    ``cached_prefix_blocks``, the instance's real prefix cache (Dynamo's KV events). No
    admission control, no global store: never rejects, never fetches.
    """

    name = "dynamo_kv"

    def __init__(self, *, overlap_score_weight: float = 1.0, seed: int = 0) -> None:
        require(
            _is_number(overlap_score_weight) and overlap_score_weight >= 0,
            "overlap_score_weight",
            "a finite number >= 0",
            overlap_score_weight,
        )
        self.overlap_score_weight = float(overlap_score_weight)
        self._rng = random.Random(seed)
        self._queued = QueuedPrefixBooks()

    def prefill_cost(self, request: RequestView, instance: PrefillInstanceView) -> float:
        """Dynamo's cost of sending ``request`` to ``instance`` (brings the router's books of
        what is queued there up to date with the view; never changes the view)."""
        request_blocks = -(-request.num_prompt_tokens // request.block_size)
        overlap = min(instance.cached_prefix_blocks, request_blocks)
        prefill_blocks = (
            request.num_prompt_tokens - overlap * request.block_size
        ) / request.block_size
        iid = instance.instance_id
        self._queued.sync(instance)
        held = self._queued.held(iid)
        # Queued there by someone else (or before this router existed): sized like this one.
        unknown = (instance.num_queued - self._queued.num_recorded(iid)) * request_blocks
        active_blocks = len(held) + self._queued.num_unhashed(iid) + unknown
        # Potential active blocks: the request's join those held, shared ones counted once.
        hashes = request.prefix_hashes[:request_blocks]
        active_blocks += request_blocks - len(hashes) + len(set(hashes).difference(held))
        return self.overlap_score_weight * prefill_blocks + active_blocks

    @staticmethod
    def decode_cost(request: RequestView, instance: DecodeInstanceView) -> float:
        """Blocks in use after the request joins (overlap weight 0 at the decode stage)."""
        in_use = -(-instance.total_context_tokens // request.block_size)
        return float(in_use + -(-request.num_prompt_tokens // request.block_size))

    def _lowest(self, costs: list[float]) -> int:
        lowest = min(costs)
        tied = [i for i, cost in enumerate(costs) if cost == lowest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision:
        prefill = cluster.prefill[
            self._lowest([self.prefill_cost(request, p) for p in cluster.prefill])
        ]
        decode = cluster.decode[
            self._lowest([self.decode_cost(request, d) for d in cluster.decode])
        ]
        request_blocks = -(-request.num_prompt_tokens // request.block_size)
        hashes = request.prefix_hashes[:request_blocks]
        self._queued.record(prefill.instance_id, hashes, request_blocks - len(hashes))
        return decide_without_store(request, cluster, prefill, decode)
