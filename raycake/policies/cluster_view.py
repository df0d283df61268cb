"""What a scheduling policy sees (plain snapshots of the cluster and of one request) and what
it returns. Pure data, validated on construction; shared by the conductor and the simulator."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from raycake.policies.step_cost_model import StepCostModel
from raycake.validation import check_count, check_number, require

# --- Which instances a decision may use ------------------------------------------------------


def routable_instances(instance_ids: Sequence[str], unavailable: Collection[str]) -> list[str]:
    """The instances a request may be sent to: those not reported down, or every one when all
    are (the request then waits in a restarting instance's queue rather than failing)."""
    up = [iid for iid in instance_ids if iid not in unavailable]
    return up or list(instance_ids)


# --- What a policy sees -----------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillInstanceView:
    instance_id: str
    # Estimated seconds of prefill work already queued (including the running chunk's remainder).
    queued_prefill_seconds: float
    num_queued: int
    cost_model: StepCostModel
    # Leading blocks of THIS request's prompt that the instance holds in its local prefix cache.
    cached_prefix_blocks: int

    def __post_init__(self) -> None:
        where = f"prefill instance {self.instance_id!r}"
        check_number(f"{where}.queued_prefill_seconds", self.queued_prefill_seconds, low=0)
        check_count(f"{where}.num_queued", self.num_queued)
        check_count(f"{where}.cached_prefix_blocks", self.cached_prefix_blocks)
        require(
            isinstance(self.cost_model, StepCostModel),
            f"{where}.cost_model",
            "a StepCostModel",
            self.cost_model,
        )


@dataclass(frozen=True)
class DecodeInstanceView:
    instance_id: str
    # Requests decoding here or assigned here and still in prefill: the conductor counts a
    # request from the moment it is scheduled, so loads on their way are not missed.
    num_running: int
    max_num_seqs: int
    total_context_tokens: int
    # Blocks neither in use nor reserved for assigned requests.
    free_kv_blocks: int
    cost_model: StepCostModel
    # Expected tokens still to generate per running request (from max_tokens or a length
    # predictor); None: unknown, and the predictive load estimate falls back to the current load.
    mean_remaining_tokens: float | None = None

    def __post_init__(self) -> None:
        where = f"decode instance {self.instance_id!r}"
        check_count(f"{where}.num_running", self.num_running)
        check_count(f"{where}.max_num_seqs", self.max_num_seqs, minimum=1)
        check_count(f"{where}.total_context_tokens", self.total_context_tokens)
        check_count(f"{where}.free_kv_blocks", self.free_kv_blocks)
        require(
            isinstance(self.cost_model, StepCostModel),
            f"{where}.cost_model",
            "a StepCostModel",
            self.cost_model,
        )
        if self.mean_remaining_tokens is not None:
            check_number(
                f"{where}.mean_remaining_tokens",
                self.mean_remaining_tokens,
                low=0,
                low_exclusive=True,
            )


@dataclass(frozen=True)
class RequestView:
    request_id: str
    num_prompt_tokens: int
    block_size: int
    max_tokens: int
    # Leading blocks of the prompt available in the global KV store, and each block's size.
    store_prefix_blocks: int = 0
    store_block_bytes: int = 0
    # None: no SLO of that kind for this request (the conductor stamps the cluster's defaults).
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # The prompt's chained block hashes in order, as integers (a block's hash covers its tokens
    # and its predecessor's hash, so equal i-th hashes mean equal prefixes through block i), for
    # routers that keep their own approximate prefix trees. At most ``num_prompt_blocks + 1``:
    # Mooncake traces hash the partial last block too (ceil(tokens / block_size) ids); the
    # engine hashes full blocks only, and the conductor passes each 16-byte digest as a
    # little-endian integer. Empty: unknown (such routers then see no prefix match).
    prefix_hashes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"request {self.request_id!r}"
        check_count(f"{where}.num_prompt_tokens", self.num_prompt_tokens, minimum=1)
        check_count(f"{where}.block_size", self.block_size, minimum=1)
        check_count(f"{where}.max_tokens", self.max_tokens, minimum=1)
        check_count(f"{where}.store_prefix_blocks", self.store_prefix_blocks)
        check_count(f"{where}.store_block_bytes", self.store_block_bytes)
        for name in ("ttft_slo_s", "tbt_slo_s"):
            if getattr(self, name) is not None:
                check_number(f"{where}.{name}", getattr(self, name), low=0, low_exclusive=True)
        hashes = self.prefix_hashes
        require(
            isinstance(hashes, tuple)
            and all(isinstance(h, int) and not isinstance(h, bool) for h in hashes),
            f"{where}.prefix_hashes",
            "a tuple of integers",
            hashes if not isinstance(hashes, tuple) else [h for h in hashes if type(h) is not int],
        )
        require(
            len(hashes) <= self.num_prompt_blocks + 1,
            f"{where}.prefix_hashes",
            f"at most num_prompt_blocks + 1 = {self.num_prompt_blocks + 1} hashes "
            f"({self.num_prompt_tokens} tokens in blocks of {self.block_size})",
            f"{len(hashes)} hashes",
        )

    @property
    def num_prompt_blocks(self) -> int:
        """Full blocks of the prompt."""
        return self.num_prompt_tokens // self.block_size

    @property
    def num_reusable_prefix_blocks(self) -> int:
        """The most prompt blocks a cache hit can cover: at least one token is computed to get the
        first output token's logits (as in engine/kv_cache.py)."""
        return (self.num_prompt_tokens - 1) // self.block_size

    @property
    def num_kv_blocks_needed(self) -> int:
        """Blocks a decode instance must have free for the prompt and ``max_tokens`` outputs."""
        return -(-(self.num_prompt_tokens + self.max_tokens) // self.block_size)


@dataclass(frozen=True)
class ClusterView:
    prefill: Sequence[PrefillInstanceView]
    decode: Sequence[DecodeInstanceView]
    # Sustained store -> prefill instance bandwidth for KV blocks.
    transfer_bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            instances = getattr(self, name)
            require(len(instances) > 0, f"cluster.{name}", f"at least one {name} instance", [])
            ids = [instance.instance_id for instance in instances]
            require(len(set(ids)) == len(ids), f"cluster.{name}", "unique instance ids", ids)
        check_number(
            "cluster.transfer_bandwidth_bytes_per_s",
            self.transfer_bandwidth_bytes_per_s,
            low=0,
            low_exclusive=True,
        )


# --- What a policy returns --------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleDecision:
    prefill_instance_id: str
    decode_instance_id: str
    # Leading blocks the prefill instance fetches from the store instead of recomputing; they
    # follow the blocks it holds locally (the view's ``cached_prefix_blocks``): it reads blocks
    # [cached, cached + fetch) of the prompt, skipping those it holds by the time it runs
    # (computed meanwhile by prompts queued ahead of it).
    fetch_from_store_blocks: int
    predicted_ttft_s: float
    predicted_tbt_s: float
    # Seconds of work (fetch + compute) this request adds to the prefill instance's queue: the
    # conductor adds it to that instance's queued_prefill_seconds.
    predicted_prefill_s: float


@dataclass(frozen=True)
class Rejection:
    # Which SLO or resource failed, with the predicted and allowed numbers.
    reason: str
    predicted_ttft_s: float
    # None when no decode instance could take the request.
    predicted_tbt_s: float | None


@runtime_checkable
class SchedulingPolicy(Protocol):
    """Chooses a (prefill, decode) pair for a request, or rejects it.

    Contract: ``schedule`` reads the views and never changes them; it may update only the
    policy's own state. ``cluster`` holds at least one instance of each kind (``ClusterView``
    checks on construction).
    """

    name: str

    def schedule(
        self, request: RequestView, cluster: ClusterView
    ) -> ScheduleDecision | Rejection: ...
