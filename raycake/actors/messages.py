"""Typed messages between raycake's actors: one dataclass per hop, deltas rather than state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raycake.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from raycake.engine.llm_engine import LLMEngine
    from raycake.policies.step_cost_model import StepCostModel


@dataclass(frozen=True)
class PrefillWork:
    """Conductor's decision, sent to a PrefillInstance."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Prompt blocks to read from the KV store instead of computing, after the ones the
    # instance holds locally (0: none); the conductor's ScheduleDecision.fetch_from_store_blocks.
    fetch_from_store_blocks: int = 0
    # W3C trace context of the request's span, so this stage's span joins the same trace.
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefillResult:
    """What a PrefillInstance returns: the first token and where the prompt's KV waits."""

    request_id: str
    instance_id: str
    first_token_id: int
    # "stop" or "length" when the first token already ends the request; None to continue.
    finish_reason: str | None
    kv_handle: Any | None  # a raycake.transfer KVHandle; None when the request is finished
    block_hashes: list[bytes]  # the prompt's full blocks, now cached on this instance
    num_cached_tokens: int  # prompt tokens not computed: local prefix cache + KV store
    num_store_blocks: int  # of those blocks, how many came from the store
    store_fetch_bytes: int  # bytes read from the store for this request
    store_fetch_seconds: float  # wall time of that read (the conductor's bandwidth estimate)
    kv_bytes: int  # bytes of KV handed to the decode instance
    seconds: float  # wall time on the instance
    # finish_reason "error": why the request failed on the instance (it is not retried).
    error: str | None = None


@dataclass(frozen=True)
class DecodeWork:
    """Sent to a DecodeInstance once the prompt's KV is published."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    sampling_params: SamplingParams
    kv_handle: Any
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceLoad:
    """An instance's report to the conductor."""

    instance_id: str
    num_running: int
    num_waiting: int
    free_kv_blocks: int
    max_num_seqs: int
    cost_model: dict[str, float] | None  # StepCostModel.to_dict(), once calibrated


def instance_load(instance_id: str, engine: LLMEngine, cost_model: StepCostModel) -> InstanceLoad:
    """What an instance running ``engine`` reports, with its current cost model."""
    stats = engine.stats()
    return InstanceLoad(
        instance_id=instance_id,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        free_kv_blocks=engine.scheduler.kv_cache.num_free_blocks,
        max_num_seqs=engine.config.scheduler.max_num_seqs,
        cost_model=cost_model.to_dict(),
    )
