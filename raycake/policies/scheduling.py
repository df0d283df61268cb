"""Which prefill and decode instance serve a request, or whether to reject it: the conductor's policy.

A policy reads plain snapshots of the cluster (``ClusterView``) and of one request
(``RequestView``) and returns a ``ScheduleDecision`` or a ``Rejection``. It never changes the
views; the only state it keeps is its own (a random generator, a round-robin position). The
conductor actor and the trace simulator drive the very same objects, chosen by name
(``scheduling_policy``). ``CacheAwareScheduler`` follows Mooncake's conductor (FAST'25,
Algorithm 1); the others are the baselines it was compared with, and SGLang's and Dynamo's
cache-aware routers (``baseline_routers.py``). ``AdmissionControl`` (``baseline_admission``)
applies the conductor's early-rejection rule to any baseline's choice, for comparisons at equal
admission control.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from raycake.policies.admission_control import AdmissionControl
from raycake.policies.baseline_routers import DynamoKvRouter, SGLangCacheAwareRouter
from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    Rejection,
    RequestView,
    ScheduleDecision,
    SchedulingPolicy,
)
from raycake.policies.estimates import (
    DecodeLoad,
    PrefillPlan,
    QueuedPrefixBooks,
    decide_without_store,
    plan_prefill,
    predict_decode_load,
    predict_tbt,
)
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.validation import require

# The views and estimates are re-exported: callers take everything a policy needs from here.
__all__ = [
    "SCHEDULING_POLICIES",
    "AdmissionControl",
    "CacheAwareScheduler",
    "ClusterView",
    "DecodeInstanceView",
    "DecodeLoad",
    "DynamoKvRouter",
    "LeastLoadedScheduler",
    "PrefillInstanceView",
    "PrefillPlan",
    "RandomScheduler",
    "Rejection",
    "RequestView",
    "RoundRobinScheduler",
    "SGLangCacheAwareRouter",
    "ScheduleDecision",
    "SchedulingConfig",
    "SchedulingPolicy",
    "make_scheduling_policy",
    "plan_prefill",
    "predict_decode_load",
    "predict_tbt",
    "scheduling_policy_from_config",
]

# --- Policies ---------------------------------------------------------------------------------


class RandomScheduler:
    """Uniformly random prefill and decode instances; never rejects."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision:
        prefill = self._rng.choice(cluster.prefill)
        decode = self._rng.choice(cluster.decode)
        return decide_without_store(request, cluster, prefill, decode)


class RoundRobinScheduler:
    """The next prefill and decode instance in list order; never rejects."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision:
        prefill = cluster.prefill[self._next % len(cluster.prefill)]
        decode = cluster.decode[self._next % len(cluster.decode)]
        self._next += 1
        return decide_without_store(request, cluster, prefill, decode)


class LeastLoadedScheduler:
    """The prefill instance with the least queued work and the decode instance with the lowest
    batch occupancy (ties: the first listed); ignores caches; never rejects."""

    name = "least_loaded"

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision:
        prefill = min(cluster.prefill, key=lambda p: p.queued_prefill_seconds)
        decode = min(cluster.decode, key=lambda d: d.num_running / d.max_num_seqs)
        return decide_without_store(request, cluster, prefill, decode)


class CacheAwareScheduler:
    """Mooncake's conductor (FAST'25, Algorithm 1) over plain views.

    1. Prefill: for each instance, TTFT = queued work + fetching the store's longer prefix when
       that pays (``plan_prefill``) + computing the rest; the minimum wins (ties: first listed).
       Queued work counts against a prefix holder, so a stream of requests sharing a hot prefix
       moves on to other instances once the holder's queue exceeds what its cache saves; those
       fetch the prefix (``fetch_from_store_blocks > 0``) and become holders in turn, instead of
       all traffic herding onto the first holder.
    2. Decode: among instances with a free batch slot and free KV blocks for the prompt plus
       ``max_tokens``, the lowest predicted TBT (``predict_tbt``; ties: first listed).
    3. Early rejection (``enable_early_rejection``): reject when the predicted TTFT or TBT
       exceeds the request's SLO, or no decode instance has room. With ``predictive_rejection``
       the decode load (batch, context, free slots) is the one predicted for when this request's
       prefill finishes (``predict_decode_load``) rather than the current one: rejecting on
       current load makes prefill and decode loads oscillate, and prediction damps it (Mooncake,
       arXiv version). Free KV blocks are always those free now, since they must be reserved.
       Without early rejection, a request that no decode instance has room for goes to the one
       with the lowest predicted TBT and waits there.

    ``use_store=False`` restricts prefixes to instance-local caches (the paper's "local
    cache-aware" variant).

    Queued prefixes (``count_queued_prefixes``): an instance's prefix hit is taken as the longer
    of what it caches now and what the prompts it has queued will have computed by the time this
    request starts there (prefill is first come, first served), from the policy's own record of
    where it sent each ``prefix_hashes`` (``QueuedPrefixBooks``). Without it, while the first
    request of a session or shared context waits in a queue, every follow-up looks uncached
    everywhere, goes wherever the queue is shortest and computes the prefix again: under load
    the hit rate collapses just when it matters most (SGLang's router, whose trees record where
    it routed rather than what is cached, does not suffer this).
    """

    name = "cache_aware"

    def __init__(
        self,
        *,
        balance_threshold: float = 1.0,
        enable_early_rejection: bool = True,
        predictive_rejection: bool = False,
        use_store: bool = True,
        count_queued_prefixes: bool = True,
    ) -> None:
        require(
            isinstance(balance_threshold, (int, float)) and 1.0 <= balance_threshold < math.inf,
            "balance_threshold",
            "a finite number >= 1.0",
            balance_threshold,
        )
        self.balance_threshold = float(balance_threshold)
        self.enable_early_rejection = enable_early_rejection
        self.predictive_rejection = predictive_rejection
        self.use_store = use_store
        self.count_queued_prefixes = count_queued_prefixes
        self._queued = QueuedPrefixBooks()

    def _as_it_will_be(self, request: RequestView, instance: PrefillInstanceView):
        """The instance with the prefix its queued prompts will leave cached, if longer."""
        if not self.count_queued_prefixes:
            return instance
        self._queued.sync(instance)
        hashes = request.prefix_hashes[: request.num_reusable_prefix_blocks]
        queued = self._queued.prefix_match(instance.instance_id, hashes)
        if queued <= instance.cached_prefix_blocks:
            return instance
        return dataclasses.replace(instance, cached_prefix_blocks=queued)

    def _queued_only_blocks(
        self, request: RequestView, cluster: ClusterView, plan: PrefillPlan
    ) -> int:
        """Blocks of the plan's local prefix that the instance has only queued, not cached."""
        view = next(p for p in cluster.prefill if p.instance_id == plan.instance_id)
        planned = self._as_it_will_be(request, view).cached_prefix_blocks
        reusable = request.num_reusable_prefix_blocks
        return min(planned, reusable) - min(view.cached_prefix_blocks, reusable)

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision | Rejection:
        plan = min(
            (
                plan_prefill(
                    request,
                    self._as_it_will_be(request, instance),
                    cluster.transfer_bandwidth_bytes_per_s,
                    use_store=self.use_store,
                    balance_threshold=self.balance_threshold,
                )
                for instance in cluster.prefill
            ),
            key=lambda candidate: candidate.predicted_ttft_s,
        )
        ttft = plan.predicted_ttft_s
        horizon_s = ttft if self.predictive_rejection else 0.0
        candidates: list[tuple[float, DecodeInstanceView]] = []
        with_room: list[tuple[float, DecodeInstanceView]] = []
        for instance in cluster.decode:
            load = predict_decode_load(instance, horizon_s)
            candidate = (predict_tbt(request, instance, load), instance)
            candidates.append(candidate)
            if (
                instance.free_kv_blocks >= request.num_kv_blocks_needed
                and load.num_running + 1 <= instance.max_num_seqs
            ):
                with_room.append(candidate)
        best = min(with_room, key=lambda c: c[0]) if with_room else None

        if self.enable_early_rejection:
            reasons = []
            if request.ttft_slo_s is not None and ttft > request.ttft_slo_s:
                reasons.append(
                    f"TTFT SLO: predicted TTFT {ttft:.4g} s on {plan.instance_id!r} "
                    f"> ttft_slo_s {request.ttft_slo_s:.4g} s"
                )
            if best is None:
                most_free = max(cluster.decode, key=lambda d: d.free_kv_blocks)
                reasons.append(
                    f"decode capacity: no decode instance has a free batch slot and "
                    f"{request.num_kv_blocks_needed} free KV blocks for {request.num_prompt_tokens} "
                    f"prompt + {request.max_tokens} max tokens (most free: "
                    f"{most_free.free_kv_blocks} on {most_free.instance_id!r})"
                )
            elif request.tbt_slo_s is not None and best[0] > request.tbt_slo_s:
                reasons.append(
                    f"TBT SLO: predicted TBT {best[0]:.4g} s on {best[1].instance_id!r} "
                    f"> tbt_slo_s {request.tbt_slo_s:.4g} s"
                )
            if reasons:
                return Rejection(
                    reason="; ".join(reasons),
                    predicted_ttft_s=ttft,
                    predicted_tbt_s=None if best is None else best[0],
                )
        if best is None:
            best = min(candidates, key=lambda c: c[0])
        if self.count_queued_prefixes:
            # Only full blocks are cached; a trace's last id may name a partial one.
            self._queued.record(
                plan.instance_id, request.prefix_hashes[: request.num_prompt_blocks]
            )
        return ScheduleDecision(
            prefill_instance_id=plan.instance_id,
            decode_instance_id=best[1].instance_id,
            # Counted from the view's local blocks (the decision's contract); the instance
            # skips those its queue will have computed, as planned.
            fetch_from_store_blocks=(
                plan.fetch_from_store_blocks + self._queued_only_blocks(request, cluster, plan)
                if plan.fetch_from_store_blocks
                else 0
            ),
            predicted_ttft_s=ttft,
            predicted_tbt_s=best[0],
            predicted_prefill_s=plan.predicted_prefill_s,
        )


SCHEDULING_POLICIES: dict[str, type[SchedulingPolicy]] = {
    "random": RandomScheduler,
    "round_robin": RoundRobinScheduler,
    "least_loaded": LeastLoadedScheduler,
    "cache_aware": CacheAwareScheduler,
    "sglang_cache_aware": SGLangCacheAwareRouter,
    "dynamo_kv": DynamoKvRouter,
}


def make_scheduling_policy(name: str, **kwargs: Any) -> SchedulingPolicy:
    """A fresh policy by its config name; ``kwargs`` go to its constructor."""
    try:
        cls = SCHEDULING_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"scheduling_policy: expected one of {sorted(SCHEDULING_POLICIES)}, got {name!r}"
        ) from None
    return cls(**kwargs)


def scheduling_policy_from_config(config: SchedulingConfig) -> SchedulingPolicy:
    """A fresh policy with the options that apply to it; a baseline wrapped in
    ``AdmissionControl`` when ``baseline_admission`` asks for the conductor's rejection rule."""
    if config.policy == "cache_aware":
        return CacheAwareScheduler(
            balance_threshold=config.balance_threshold,
            enable_early_rejection=config.enable_early_rejection,
            predictive_rejection=config.predictive_rejection,
            use_store=config.use_store,
        )
    if config.policy == "random":
        policy: SchedulingPolicy = RandomScheduler(seed=config.seed)
    elif config.policy == "dynamo_kv":
        policy = DynamoKvRouter(seed=config.seed)  # the seed breaks cost ties
    else:
        policy = make_scheduling_policy(config.policy)
    if config.baseline_admission:
        return AdmissionControl(policy, predictive=config.predictive_rejection)
    return policy
