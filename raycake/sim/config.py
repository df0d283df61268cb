"""The simulated cluster's configuration, and policies by name as the conductor builds them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from raycake.policies.cluster_view import SchedulingPolicy
from raycake.policies.planner import PlannerConfig
from raycake.policies.scheduling import scheduling_policy_from_config
from raycake.policies.scheduling_config import SCHEDULING_POLICY_NAMES, SchedulingConfig
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.roofline import RooflineCostModel
from raycake.sim.traces import TRACE_BLOCK_SIZE
from raycake.validation import is_count, is_number, require


class StepTimer(Protocol):
    """What times simulated steps: a ``StepCostModel`` or a ``RooflineCostModel``."""

    def prefill_seconds(self, num_new_tokens: int, num_cached_tokens: int) -> float: ...

    def decode_step_seconds(self, batch_size: float, total_context_tokens: float) -> float: ...


def check_step_timer(name: str, timer: object) -> None:
    """None, or an object that times prefill and decode steps (``StepTimer``)."""
    require(
        timer is None
        or (hasattr(timer, "prefill_seconds") and hasattr(timer, "decode_step_seconds")),
        name,
        "None or an object with prefill_seconds and decode_step_seconds",
        timer,
    )


def _check(condition: bool, name: str, expected: str, got: object) -> None:
    require(condition, f"simulation.{name}", expected, got)


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """The simulated cluster; ``from_roofline`` derives the numbers from GPU and model."""

    num_prefill: int
    num_decode: int
    # What the policies predict with (and, without ``step_timer``, what times the steps).
    cost_model: StepCostModel
    kv_block_bytes: int  # bytes of one block's KV (RequestView.store_block_bytes)
    transfer_bandwidth_bytes_per_s: float  # store -> prefill and prefill -> decode links
    decode_kv_blocks: int  # KV blocks per decode instance
    # Per prefill instance; None: unlimited, 0: no local prefix cache.
    prefill_cache_blocks: int | None = None
    # The global KV store; None: unlimited, 0: no store (instance-local caches only).
    store_capacity_blocks: int | None = None
    max_num_seqs: int = 128
    block_size: int = TRACE_BLOCK_SIZE
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # Split prefills into chunks of this many tokens (each chunk pays the step's fixed cost).
    prefill_chunk_tokens: int | None = None
    eviction_policy: str = "lru"
    step_timer: StepTimer | None = None
    # Autoscaling (``autoscaling.Autoscaler``); None: num_prefill / num_decode throughout.
    # With a planner they are the counts at the start.
    planner: PlannerConfig | None = None
    planner_interval_s: float = 5.0  # how often the planner sees the last window's view
    # A new instance is paid for at once but takes work only this long after (node + model load).
    instance_startup_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "kv_block_bytes", "decode_kv_blocks"):
            _check(is_count(getattr(self, name), 1), name, "an integer >= 1", getattr(self, name))
        for name in ("max_num_seqs", "block_size"):
            _check(is_count(getattr(self, name), 1), name, "an integer >= 1", getattr(self, name))
        for name in ("prefill_cache_blocks", "store_capacity_blocks"):
            value = getattr(self, name)
            _check(value is None or is_count(value, 0), name, "None or an integer >= 0", value)
        _check(
            self.prefill_chunk_tokens is None or is_count(self.prefill_chunk_tokens, 1),
            "prefill_chunk_tokens",
            "None or an integer >= 1",
            self.prefill_chunk_tokens,
        )
        bandwidth = self.transfer_bandwidth_bytes_per_s
        _check(
            isinstance(bandwidth, (int, float)) and 0 < bandwidth < math.inf,
            "transfer_bandwidth_bytes_per_s",
            "a finite number > 0",
            bandwidth,
        )
        for name in ("ttft_slo_s", "tbt_slo_s"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, (int, float)) and 0 < value < math.inf),
                name,
                "None or a finite number > 0 (seconds)",
                value,
            )
        _check(
            isinstance(self.cost_model, StepCostModel),
            "cost_model",
            "a StepCostModel",
            self.cost_model,
        )
        _check(
            self.planner is None or isinstance(self.planner, PlannerConfig),
            "planner",
            "None or a PlannerConfig",
            self.planner,
        )
        for name in ("planner_interval_s", "instance_startup_s"):
            value = getattr(self, name)
            low = 0 if name == "instance_startup_s" else 1e-3
            _check(
                is_number(value) and value >= low,
                name,
                f"a finite number >= {low:g} (seconds)",
                value,
            )
        check_step_timer("simulation.step_timer", self.step_timer)

    @classmethod
    def from_roofline(
        cls,
        roofline: RooflineCostModel,
        *,
        num_prefill: int,
        num_decode: int,
        block_size: int = TRACE_BLOCK_SIZE,
        max_num_seqs: int = 128,
        gpu_memory_utilization: float = 0.9,
        **overrides: object,
    ) -> SimulationConfig:
        """Instances of ``roofline``'s GPU and model: the fitted step costs, KV block size,
        link bandwidth, and HBM left for KV as decode capacity and prefill cache."""
        capacity = roofline.kv_capacity_blocks(block_size, gpu_memory_utilization)
        values: dict[str, object] = {
            "num_prefill": num_prefill,
            "num_decode": num_decode,
            "cost_model": roofline.step_cost_model(max_num_seqs=max_num_seqs),
            "kv_block_bytes": roofline.kv_block_bytes(block_size),
            "transfer_bandwidth_bytes_per_s": roofline.transfer_bandwidth_bytes_per_s,
            "decode_kv_blocks": capacity,
            "prefill_cache_blocks": capacity,
            "max_num_seqs": max_num_seqs,
            "block_size": block_size,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def policy_from_name(
    name: str,
    *,
    enable_early_rejection: bool = True,
    predictive_rejection: bool = False,
    use_store: bool = True,
    seed: int = 0,
) -> SchedulingPolicy:
    """A fresh policy by its config name, as the conductor builds it; ``cache_aware_local`` is
    the cache-aware conductor restricted to instance-local caches (no store fetches)."""
    if name == "cache_aware_local":
        name, use_store = "cache_aware", False
    return scheduling_policy_from_config(
        SchedulingConfig(
            policy=name,
            enable_early_rejection=enable_early_rejection,
            predictive_rejection=predictive_rejection,
            use_store=use_store,
            seed=seed,
        )
    )


POLICY_NAMES = (*SCHEDULING_POLICY_NAMES, "cache_aware_local")
