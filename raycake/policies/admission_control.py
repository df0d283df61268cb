"""The conductor's early rejection as a wrapper around any scheduling policy.

Only the cache-aware conductor rejects requests it predicts will miss their SLOs; the baseline
routers admit everything, so under overload their queues grow without bound and hardly any
request is served in time. Comparing them at such loads measures admission control, not
placement. ``AdmissionControl`` lets the wrapped policy choose a (prefill, decode) pair, then
applies the conductor's rule (``CacheAwareScheduler`` with ``enable_early_rejection``) to that
pair, with the same estimators (``estimates.py``):

1. predicted TTFT = the prefill instance's queued seconds + fetching the blocks the decision
   reads from the store + computing the rest of the prompt; reject when over ``ttft_slo_s``;
2. the decode instance needs a free batch slot and free KV blocks for the prompt plus
   ``max_tokens`` (the conductor rejects when no instance has room; here the router has chosen
   one, so that one must have room);
3. predicted TBT = its decode step with the request joined (at the current load, or, with
   ``predictive``, at the load predicted for when the prefill finishes); reject when over
   ``tbt_slo_s``.

A request without an SLO of a kind is never rejected for it. Admitted decisions carry these
predictions. Pure Python over the plain views.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    Rejection,
    RequestView,
    ScheduleDecision,
    SchedulingPolicy,
)
from raycake.policies.estimates import predict_decode_load, predict_tbt
from raycake.policies.step_cost_model import transfer_seconds
from raycake.validation import require

ADMISSION_SUFFIX = "+admit"


def predicted_ttft_s(
    request: RequestView,
    prefill: PrefillInstanceView,
    fetch_from_store_blocks: int,
    bandwidth_bytes_per_s: float,
) -> float:
    """Queue + store fetch + compute on ``prefill``: ``plan_prefill``'s terms for a decision that
    reads ``fetch_from_store_blocks`` blocks after those the instance caches."""
    reusable = request.num_reusable_prefix_blocks
    local = min(prefill.cached_prefix_blocks, reusable)
    fetched = max(0, min(fetch_from_store_blocks, reusable - local))
    cached_tokens = (local + fetched) * request.block_size
    transfer = (
        transfer_seconds(fetched * request.store_block_bytes, bandwidth_bytes_per_s)
        if fetched
        else 0.0
    )
    compute = prefill.cost_model.prefill_seconds(
        request.num_prompt_tokens - cached_tokens, cached_tokens
    )
    return prefill.queued_prefill_seconds + transfer + compute


class AdmissionVerdict(NamedTuple):
    predicted_ttft_s: float
    predicted_tbt_s: float
    # The decode instance has a free batch slot and KV blocks for the request.
    has_room: bool
    # Why to reject (every failed rule, joined); None: admit.
    reason: str | None


def admission_check(
    request: RequestView,
    prefill: PrefillInstanceView,
    decode: DecodeInstanceView,
    *,
    fetch_from_store_blocks: int,
    bandwidth_bytes_per_s: float,
    predictive: bool = False,
) -> AdmissionVerdict:
    """The conductor's early-rejection rule for serving ``request`` on this pair."""
    ttft = predicted_ttft_s(request, prefill, fetch_from_store_blocks, bandwidth_bytes_per_s)
    load = predict_decode_load(decode, ttft if predictive else 0.0)
    tbt = predict_tbt(request, decode, load)
    reasons = []
    if request.ttft_slo_s is not None and ttft > request.ttft_slo_s:
        reasons.append(
            f"TTFT SLO: predicted TTFT {ttft:.4g} s on {prefill.instance_id!r} "
            f"> ttft_slo_s {request.ttft_slo_s:.4g} s"
        )
    needed = request.num_kv_blocks_needed
    has_room = decode.free_kv_blocks >= needed and load.num_running + 1 <= decode.max_num_seqs
    if not has_room:
        reasons.append(
            f"decode capacity: {decode.instance_id!r} has {decode.free_kv_blocks} free KV "
            f"blocks (needs {needed}) and {load.num_running:.4g} of {decode.max_num_seqs} "
            f"batch slots taken"
        )
    elif request.tbt_slo_s is not None and tbt > request.tbt_slo_s:
        reasons.append(
            f"TBT SLO: predicted TBT {tbt:.4g} s on {decode.instance_id!r} "
            f"> tbt_slo_s {request.tbt_slo_s:.4g} s"
        )
    return AdmissionVerdict(ttft, tbt, has_room, "; ".join(reasons) or None)


class AdmissionControl:
    """``inner`` chooses; the conductor's early-rejection rule admits or rejects its choice.

    ``predictive`` mirrors the conductor's ``predictive_rejection``. The inner policy's own
    state (prefix trees, books of queued prompts) records a request it chose even when the
    wrapper then rejects it: a router placed behind a real admission gate would not learn of
    the rejection either.
    """

    def __init__(self, inner: SchedulingPolicy, *, predictive: bool = False) -> None:
        require(
            isinstance(inner, SchedulingPolicy) and not isinstance(inner, AdmissionControl),
            "inner",
            "a SchedulingPolicy (not already wrapped)",
            inner,
        )
        self.inner = inner
        self.predictive = predictive
        self.name = f"{inner.name}{ADMISSION_SUFFIX}"

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision | Rejection:
        decision = self.inner.schedule(request, cluster)
        if isinstance(decision, Rejection):
            return decision
        prefill = next(p for p in cluster.prefill if p.instance_id == decision.prefill_instance_id)
        decode = next(d for d in cluster.decode if d.instance_id == decision.decode_instance_id)
        verdict = admission_check(
            request,
            prefill,
            decode,
            fetch_from_store_blocks=decision.fetch_from_store_blocks,
            bandwidth_bytes_per_s=cluster.transfer_bandwidth_bytes_per_s,
            predictive=self.predictive,
        )
        if verdict.reason is not None:
            return Rejection(
                reason=verdict.reason,
                predicted_ttft_s=verdict.predicted_ttft_s,
                # As the conductor reports it: no TBT when the decode instance has no room.
                predicted_tbt_s=verdict.predicted_tbt_s if verdict.has_room else None,
            )
        return dataclasses.replace(
            decision,
            predicted_ttft_s=verdict.predicted_ttft_s,
            predicted_tbt_s=verdict.predicted_tbt_s,
        )
