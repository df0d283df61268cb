"""Titans MAG ("memory as a gate", Behrouz et al. 2025, section 4.2) on the Llama decoder.

Each decoder layer attends over a sliding window of the last ``sliding_window`` positions plus
``num_persistent_tokens`` learned key/value pairs every query sees (the paper's persistent
memory, kept per layer as titans-pytorch does); in a memory layer that attention output ``y`` is
gated by the neural long-term memory read from the same input: ``o = y * sigmoid(norm(M(x)))``,
the paper's normalisation with learnable weights followed by a non-linearity.

MAG is the variant that fits a paged engine: its attention is a window over the paged KV (no
segment-level recomputation as in MAC), and the memory is a fixed-size recurrent state beside it.

Two forward paths, as for Llama:
- training (no cache, ``[B, S]``): each memory runs over whole sequences from its initial state;
- serving (flattened step, paged KV): a ``MemoryStep`` owns every sequence's memory state and
  runs each memory layer over the step's tokens (the engine's ``memory_state`` module).

Legend: T tokens in the step (or B x S when training), E hidden size.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from raycake.model.attention import AttentionMetadata
from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, RMSNorm
from raycake.model.titans import NeuralMemory


class MemoryStep(Protocol):
    """The engine's side of a serving step: reads and writes each sequence's memory state."""

    def run(self, layer_index: int, memory: NeuralMemory, x: torch.Tensor) -> torch.Tensor:
        """Retrieve for (and store) the step's tokens ``x`` [T, E] -> [T, E] (float32)."""
        ...


class TitansMAGDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (its attention windowed by the config), plus the memory gate."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        assert config.titans is not None and not config.num_experts
        super().__init__(config, MoEConfig(), index)
        self.index = index
        self.memory: NeuralMemory | None = None
        self.gate_norm: RMSNorm | None = None
        if config.titans.has_memory(index):
            self.memory = NeuralMemory(config.titans.memory)
            self.gate_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Set by the engine for one step (None when training): see ``TitansMAGModel.forward``.
        self.memory_step: MemoryStep | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata | None,
        kv_cache: torch.Tensor | None,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        y = self.self_attn(h, cos, sin, meta, kv_cache)
        if self.memory is not None:
            assert self.gate_norm is not None
            if self.memory_step is None:  # whole sequences from the memory's initial state
                retrieved, _ = self.memory(h)
            else:
                retrieved = self.memory_step.run(self.index, self.memory, h)
            y = y * torch.sigmoid(self.gate_norm(retrieved.to(y.dtype)))
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x))


class TitansMAGModel(LlamaModel):
    def make_layer(self, config: ModelConfig, moe: MoEConfig, index: int) -> nn.Module:
        return TitansMAGDecoderLayer(config, index)


class TitansMAGForCausalLM(LlamaForCausalLM):
    """The served Titans model: Llama's interface, plus ``memory`` for a serving step."""

    model_class = TitansMAGModel

    def memories(self) -> dict[int, NeuralMemory]:
        """Layer index -> that layer's neural memory."""
        return {
            layer.index: layer.memory for layer in self.model.layers if layer.memory is not None
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | None = None,
        kv_caches: list[torch.Tensor] | None = None,
        memory: MemoryStep | None = None,
    ) -> torch.Tensor:
        """As Llama's; a paged step (``meta`` given) needs ``memory``, the sequences' states."""
        if meta is not None and memory is None:
            raise ValueError("memory: a paged Titans step needs the sequences' memory states")
        layers = list(self.model.layers)
        for layer in layers:
            layer.memory_step = memory
        try:
            return self.model(input_ids, positions, meta, kv_caches)
        finally:
            for layer in layers:
                layer.memory_step = None


def build_model(config: ModelConfig, moe: MoEConfig | None = None) -> LlamaForCausalLM:
    """The module for a checkpoint's architecture."""
    if config.is_titans:
        return TitansMAGForCausalLM(config, moe)
    return LlamaForCausalLM(config, moe)
