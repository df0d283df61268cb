"""The scheduler/runner contract: one message each way per step.

Scheduler -> runner: ``SchedulerOutput`` carries deltas only (new requests in full, then just
new block ids for requests the runner already holds), so the runner can live in another
process. Runner -> scheduler: ``RunnerOutput`` carries the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raycake.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen (or must rebuild after a preemption)."""

    request_id: str
    token_ids: list[int]  # every known token: prompt, then outputs so far (after a preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]  # the request's whole block table
    num_computed_tokens: int  # tokens whose KV is already in those blocks (prefix-cache hits)
    # Titans models: the request's memory-state slot, and the snapshot slot to start it from
    # (None: from the memory's initial state, or, for an imported request, as written).
    memory_slot: int | None = None
    memory_source_slot: int | None = None


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already holds: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]  # appended to the request's block table
    num_computed_tokens: int  # tokens whose KV is in the cache before this step


@dataclass
class SchedulerOutput:
    """What to run in one step.

    NOTE: ``num_scheduled_tokens`` is ordered: one-token decodes first, then prefill chunks.
    A request samples a token this step iff its chunk reaches the end of its known tokens.
    """

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step
    total_num_scheduled_tokens: int
    # Finished or aborted since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    # Preempted this step: the runner drops their state; they come back as new requests.
    preempted_request_ids: set[str] = field(default_factory=set)
    # Verify steps: request id -> draft tree nodes scheduled after its last token (included in
    # num_scheduled_tokens). Such a request emits 1 to 1 + drafts tokens.
    num_draft_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RunnerOutput:
    """What one step produced."""

    # request id -> tokens sampled this step, for every request whose chunk reached the end of
    # its known tokens (exactly one token per request without speculative decoding; accepted
    # drafts then the target's own token for a verify step).
    sampled_token_ids: dict[str, list[int]]
    # request id -> why it failed this step (its sampling or verification raised). Such a
    # request has no entry in ``sampled_token_ids``; the scheduler finishes it with "error".
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestUpdate:
    """Scheduler -> engine after a step: a request's new tokens and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    error: str | None = None  # why, for "error"


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use by running requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
