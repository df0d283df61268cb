"""Llama 3 (and its MoE siblings, Mixtral and Switch-Llama) in plain torch: one forward over a flattened batch that reads and writes a paged KV cache.

Legend: T tokens in the step (or B x S when training without a cache), E hidden size,
H query heads, K kv heads, Dh head dim, V vocabulary.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` except two fused projections
(``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up), which the loader assembles from the
checkpoint's separate tensors: one matmul instead of three (two) per layer per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycake.model.attention import AttentionMetadata, dense_causal_attention, paged_attention
from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.moe import MoEFeedForward
from raycake.model.rope import RotaryEmbedding, apply_rotary
from raycake.policies.routing import Router, RoutingResult, make_router


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in fp32 and cast back before the weight, exactly as transformers does
        # (one fused kernel instead of six small ops: this runs twice per layer per step).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        # Titans MAG: a sliding window (the runner's masks carry it on the paged path) and
        # persistent-memory tokens: learned K/V every query attends, [2, K, Np, Dh].
        titans = config.titans
        self.sliding_window = titans.sliding_window if titans is not None else None
        self.persistent_kv: nn.Parameter | None = None
        if titans is not None and titans.num_persistent_tokens:
            shape = (2, self.num_kv_heads, titans.num_persistent_tokens, self.head_dim)
            self.persistent_kv = nn.Parameter(torch.randn(shape) * 0.02)

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., E] -> rotated q [..., H, Dh], rotated k [..., K, Dh], v [..., K, Dh]."""
        lead = x.shape[:-1]
        qkv = self.qkv_proj(x)  # [..., (H + 2K) * Dh]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Rotate q and k heads in one go: they share cos/sin.
        qk = apply_rotary(
            qk.view(*lead, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin
        )
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
        return q, k, v.view(*lead, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata | None,
        kv_cache: torch.Tensor | None,
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # (T,) or (B, S)
        q, k, v = self.project_qkv(x, cos, sin)
        sinks = None
        if self.persistent_kv is not None:
            sinks = (self.persistent_kv[0], self.persistent_kv[1])
        if meta is None:
            out = dense_causal_attention(q, k, v, self.scale, self.sliding_window, sinks)
        else:
            assert kv_cache is not None, "a paged step needs this layer's KV cache"
            out = paged_attention(q, k, v, kv_cache, meta, self.scale, sinks)
        return self.o_proj(out.reshape(*lead, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def router_for(config: ModelConfig, moe: MoEConfig) -> Router:
    """The routing policy of a model's MoE layers: the checkpoint's own unless ``moe`` says."""
    name = moe.router or config.router_type
    if name == "topk":
        return make_router("topk", top_k=config.num_experts_per_tok)
    if name == "switch":
        return make_router(
            "switch",
            capacity_factor=moe.capacity_factor,
            drop_tokens=moe.capacity_factor is not None,
        )
    return make_router("hash", num_experts=config.num_experts)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, moe: MoEConfig, index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp: nn.Module = LlamaMLP(config)
        if config.is_moe_layer(index):  # the same layer with a routed, sparse feed-forward
            router = router_for(config, moe)
            self.mlp = MoEFeedForward(
                config.hidden_size, config.intermediate_size, config.num_experts, router
            )
        # The last step's expert routing (MoE layers only), for load statistics.
        self.last_routing: RoutingResult | None = None
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata | None,
        kv_cache: torch.Tensor | None,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        normed = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            # Token ids feed routers that route by token (hash routing).
            ffn, self.last_routing = self.mlp(normed, token_ids)
        else:
            ffn = self.mlp(normed)
        return x + ffn


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.make_layer(config, moe, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def make_layer(self, config: ModelConfig, moe: MoEConfig, index: int) -> nn.Module:
        return LlamaDecoderLayer(config, moe, index)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | None = None,
        kv_caches: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [..., E]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [..., Dh]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, None if kv_caches is None else kv_caches[i], input_ids)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The served model. ``forward`` returns final hidden states; ``compute_logits`` projects them."""

    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: ModelConfig, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config, moe or MoEConfig())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | None = None,
        kv_caches: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] with ``meta`` (paged), or [B, S] without (dense causal)."""
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [..., E] -> [..., V], always fp32 so sampling is stable in every weight dtype.
        return self.lm_head(hidden).float()
