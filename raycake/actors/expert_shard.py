"""Expert parallelism: ExpertShard holds a contiguous range of every MoE layer's experts;
ShardedExperts stands in for a layer's local experts and sends each shard one call per step.

The shard loads its experts from the checkpoint itself, so Ray restarting a dead shard
(``max_restarts``) brings the same weights back, and ``max_task_retries`` re-runs the call that
was in flight. Tokens travel as numpy arrays (zero-copy through the object store; a torch
tensor would be copied), bfloat16 as its raw 16-bit pattern.

Legend: N kept (token, choice) pairs grouped by expert, H hidden size, E experts.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from raycake.model.moe import FusedExperts, MoEFeedForward, combine, plan_dispatch


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the array's memory. NOTE: arrays from the object store are read-only;
    the tensors made here are only ever read (matmul inputs, then copied by torch.cat)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class ExpertRange:
    """Experts ``start .. end-1`` of every MoE layer."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(
                f"expert range: expected 0 <= start < end, got {self.start}..{self.end}"
            )


def expert_ranges(num_experts: int, num_shards: int) -> list[ExpertRange]:
    """Split E experts into ``num_shards`` contiguous ranges as even as possible."""
    if not 1 <= num_shards <= num_experts:
        raise ValueError(f"moe.num_expert_shards: expected 1..{num_experts}, got {num_shards}")
    bounds = [round(i * num_experts / num_shards) for i in range(num_shards + 1)]
    return [ExpertRange(a, b) for a, b in itertools.pairwise(bounds)]


class ExpertShard:
    """A plain class; ``create_expert_shards`` runs it as a Ray actor."""

    def __init__(self, model_dir: str | Path, experts: ExpertRange, dtype: str = "float32") -> None:
        from raycake.model.loader import load_model

        model = load_model(model_dir, dtype=dtype)
        self.experts = experts
        self.dtype = next(model.parameters()).dtype
        self.layers: dict[int, FusedExperts] = {}
        for index, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, MoEFeedForward):
                full = layer.mlp.experts
                part = FusedExperts(experts.end - experts.start, 1, 1)
                part.intermediate_size = full.intermediate_size
                part.gate_up_proj = nn.Parameter(
                    full.gate_up_proj[experts.start : experts.end].clone()
                )
                part.down_proj = nn.Parameter(full.down_proj[experts.start : experts.end].clone())
                self.layers[index] = part.requires_grad_(False)
        if not self.layers:
            raise ValueError(f"{model_dir}: the model has no MoE layers to shard")

    def ready(self) -> ExpertRange:
        return self.experts

    @torch.inference_mode()
    def run(self, layer: int, grouped: np.ndarray, counts: list[int]) -> np.ndarray:
        """grouped [N, H] sorted by expert, ``counts`` for this shard's experts -> [N, H]."""
        x = from_wire(grouped, self.dtype)
        return to_wire(self.layers[layer].run_grouped(x, counts))


class ShardedExperts(nn.Module):
    """Drop-in for a layer's FusedExperts: the experts live in ExpertShard actors."""

    def __init__(self, layer: int, num_experts: int, shards: list[tuple[Any, ExpertRange]]) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.shards = shards

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        plan = plan_dispatch(expert_indices, kept, self.num_experts)
        grouped = x[plan.tokens]  # [N, H]
        refs, start = [], 0
        for handle, experts in self.shards:
            counts = plan.counts[experts.start : experts.end]
            n = sum(counts)
            if n:  # one call per shard per step, all of its experts' tokens together
                refs.append(
                    handle.run.remote(self.layer, to_wire(grouped[start : start + n]), counts)
                )
            start += n
        # Submit all, then wait once.
        parts = [from_wire(a, x.dtype) for a in ray.get(refs)]
        out = torch.cat(parts) if parts else grouped  # [N, H]
        return combine(x, plan, gates, out)


def create_expert_shards(
    model_dir: str | Path,
    num_experts: int,
    num_shards: int,
    dtype: str = "float32",
    max_restarts: int = 2,
    actor_options: dict[str, Any] | None = None,
) -> list[tuple[Any, ExpertRange]]:
    """Start the shard actors (restartable; an in-flight call is retried after a restart)."""
    remote = ray.remote(ExpertShard).options(
        max_restarts=max_restarts, max_task_retries=-1, **(actor_options or {})
    )
    shards = [
        (remote.remote(str(model_dir), r, dtype), r) for r in expert_ranges(num_experts, num_shards)
    ]
    ray.get([handle.ready.remote() for handle, _ in shards])
    return shards


def attach_expert_shards(model: nn.Module, shards: list[tuple[Any, ExpertRange]]) -> int:
    """Route every MoE layer's experts through the shards and drop the local expert weights;
    returns how many layers now run expert-parallel."""
    attached = 0
    for index, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoEFeedForward):
            layer.mlp.experts = ShardedExperts(index, layer.mlp.num_experts, shards)
            attached += 1
    return attached


def enable_expert_parallelism(engine: Any) -> list[tuple[Any, ExpertRange]]:
    """Start the shards ``engine.config.moe`` asks for and route the model's MoE layers through
    them; no-op (returns []) for a dense model or ``num_expert_shards == 0``."""
    config = engine.config
    num_experts = engine.model.config.num_experts
    if not config.moe.num_expert_shards or not num_experts:
        return []
    shards = create_expert_shards(
        engine.model_dir, num_experts, config.moe.num_expert_shards, config.dtype
    )
    attach_expert_shards(engine.model, shards)
    return shards
