"""What serving a request on a given instance would cost: prefill plans (queue, store fetch,
compute), decode loads, current or predicted, and the prompts still queued on each prefill
instance. Shared by the scheduling policies and the trace simulator; pure Python over the plain
views of ``cluster_view.py``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    RequestView,
    ScheduleDecision,
)
from raycake.policies.step_cost_model import transfer_seconds


@dataclass(frozen=True)
class PrefillPlan:
    """How one prefill instance would serve a request, and when its first token would come."""

    instance_id: str
    fetch_from_store_blocks: int
    queue_s: float
    transfer_s: float
    compute_s: float

    @property
    def predicted_prefill_s(self) -> float:
        return self.transfer_s + self.compute_s

    @property
    def predicted_ttft_s(self) -> float:
        return self.queue_s + self.transfer_s + self.compute_s


def plan_prefill(
    request: RequestView,
    instance: PrefillInstanceView,
    bandwidth_bytes_per_s: float,
    *,
    use_store: bool = True,
    balance_threshold: float = 1.0,
) -> PrefillPlan:
    """Recompute what the instance lacks locally, or fetch the store's longer prefix first.

    The fetch is considered only when the store's prefix is more than ``balance_threshold``
    times the local one (any length over an empty local cache), and taken only when it predicts
    an earlier first token. The fetched blocks stay in the instance's prefix cache, so a hot
    prefix gets replicated wherever its requests are sent (Mooncake's KV-cache balancing).
    NOTE: fetching all of the store's extra blocks or none is optimal: recomputing a block costs
    more the later it sits (attention), while fetching one costs the same anywhere.
    """
    block_size, num_tokens = request.block_size, request.num_prompt_tokens
    local = min(instance.cached_prefix_blocks, request.num_reusable_prefix_blocks)
    store = min(request.store_prefix_blocks, request.num_reusable_prefix_blocks)
    cost = instance.cost_model
    recompute = PrefillPlan(
        instance_id=instance.instance_id,
        fetch_from_store_blocks=0,
        queue_s=instance.queued_prefill_seconds,
        transfer_s=0.0,
        compute_s=cost.prefill_seconds(num_tokens - local * block_size, local * block_size),
    )
    if not use_store or store <= local or store <= balance_threshold * local:
        return recompute
    fetch = PrefillPlan(
        instance_id=instance.instance_id,
        fetch_from_store_blocks=store - local,
        queue_s=instance.queued_prefill_seconds,
        transfer_s=transfer_seconds(
            (store - local) * request.store_block_bytes, bandwidth_bytes_per_s
        ),
        compute_s=cost.prefill_seconds(num_tokens - store * block_size, store * block_size),
    )
    return fetch if fetch.predicted_ttft_s < recompute.predicted_ttft_s else recompute


@dataclass(frozen=True)
class DecodeLoad:
    """A decode instance's batch, current or predicted (hence fractional)."""

    num_running: float
    total_context_tokens: float


def predict_decode_load(instance: DecodeInstanceView, horizon_s: float) -> DecodeLoad:
    """The load ``instance`` is expected to carry ``horizon_s`` from now.

    Running requests' remaining lengths are taken as spread evenly over
    [0, 2 * mean_remaining_tokens], so within k decode steps a fraction k / (2 * mean) of them
    finishes; survivors keep their share of the context and grow by one token per step. Steps
    are timed at the current load, which errs towards less drain (steps speed up as the batch
    shrinks). Requests assigned in the meantime are not modelled: the conductor counts them
    in ``num_running`` once scheduled.
    """
    if horizon_s <= 0 or instance.num_running == 0 or instance.mean_remaining_tokens is None:
        return DecodeLoad(instance.num_running, instance.total_context_tokens)
    step_s = instance.cost_model.decode_step_seconds(
        instance.num_running, instance.total_context_tokens
    )
    if step_s == 0:
        return DecodeLoad(0.0, 0.0)
    num_steps = horizon_s / step_s
    surviving_fraction = max(0.0, 1.0 - num_steps / (2 * instance.mean_remaining_tokens))
    num_surviving = instance.num_running * surviving_fraction
    return DecodeLoad(
        num_running=num_surviving,
        total_context_tokens=instance.total_context_tokens * surviving_fraction
        + num_surviving * num_steps,
    )


def predict_tbt(request: RequestView, instance: DecodeInstanceView, load: DecodeLoad) -> float:
    """The decode step time once the request joins ``load`` with its prompt as context."""
    return instance.cost_model.decode_step_seconds(
        load.num_running + 1, load.total_context_tokens + request.num_prompt_tokens
    )


def decide_without_store(
    request: RequestView,
    cluster: ClusterView,
    prefill: PrefillInstanceView,
    decode: DecodeInstanceView,
) -> ScheduleDecision:
    """The baselines' decision: no store fetches; predictions from current loads."""
    plan = plan_prefill(request, prefill, cluster.transfer_bandwidth_bytes_per_s, use_store=False)
    load = predict_decode_load(decode, horizon_s=0.0)
    return ScheduleDecision(
        prefill_instance_id=prefill.instance_id,
        decode_instance_id=decode.instance_id,
        fetch_from_store_blocks=0,
        predicted_ttft_s=plan.predicted_ttft_s,
        predicted_tbt_s=predict_tbt(request, decode, load),
        predicted_prefill_s=plan.predicted_prefill_s,
    )


class QueuedPrefixBooks:
    """A policy's own record of the prompts it sent to each prefill instance that have not
    finished their prefill there: which blocks they will have computed when a new request
    queued behind them starts.

    The views say only how many requests each instance has queued (``num_queued``, the running
    one included); prefill is first come, first served, so of the prompts recorded for an
    instance the newest ``num_queued`` are still there and the older ones are done (and now in
    ``cached_prefix_blocks``, unless evicted). ``sync`` drops those. Blocks are chained hashes
    (``RequestView.prefix_hashes``); one shared by several queued prompts is held once.
    """

    def __init__(self) -> None:
        self._routed: dict[str, deque[tuple[tuple[int, ...], int]]] = {}  # oldest first
        self._held: dict[str, Counter[int]] = {}  # hashed blocks of the queued, with counts
        self._unhashed: dict[str, int] = {}

    def sync(self, instance: PrefillInstanceView) -> None:
        """Forget the prompts the instance has finished (call once per view, before reading)."""
        iid = instance.instance_id
        routed = self._routed.setdefault(iid, deque())
        held = self._held.setdefault(iid, Counter())
        while len(routed) > instance.num_queued:
            hashes, num_unhashed = routed.popleft()
            self._unhashed[iid] -= num_unhashed
            for h in hashes:
                held[h] -= 1
                if held[h] == 0:
                    del held[h]

    def record(self, instance_id: str, hashes: tuple[int, ...], num_unhashed: int = 0) -> None:
        """A prompt sent to ``instance_id``: its hashed blocks and how many more it has."""
        self._routed.setdefault(instance_id, deque()).append((hashes, num_unhashed))
        self._held.setdefault(instance_id, Counter()).update(hashes)
        self._unhashed[instance_id] = self._unhashed.get(instance_id, 0) + num_unhashed

    def num_recorded(self, instance_id: str) -> int:
        return len(self._routed.get(instance_id, ()))

    def held(self, instance_id: str) -> Counter[int]:
        """Hashed blocks of the queued prompts (read-only by contract), with counts."""
        return self._held.setdefault(instance_id, Counter())

    def num_unhashed(self, instance_id: str) -> int:
        return self._unhashed.get(instance_id, 0)

    def prefix_match(self, instance_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` that prompts queued on the instance compute."""
        held = self._held.get(instance_id)
        num_matched = 0
        if held:
            for h in hashes:
                if h not in held:
                    break
                num_matched += 1
        return num_matched
