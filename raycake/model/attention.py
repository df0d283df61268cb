"""Attention over a paged KV cache for a flattened batch of decodes and prefill chunks.

Legend: T tokens in the step, H query heads, K kv heads, G = H / K, Dh head dim,
S cache slots (N blocks x P tokens per block), M most blocks of a decode, C one span's context.

Context is read a whole block at a time (``index_select`` of P x K x Dh rows), which is an
order of magnitude faster on CPU than gathering slot by slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QuerySpan:
    """Tokens ``start:end`` of the step belong to one sequence and attend ``context_slots``."""

    start: int
    end: int
    block_ids: torch.Tensor  # [ceil(C / P)] the sequence's blocks, in position order
    context_len: int  # C: positions 0..C-1 are attended (the span's own tokens included)
    # [end-start, C] additive mask: 0 where query i may attend key j, -inf elsewhere;
    # None means plain causal (no cached prefix).
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the runner and shared by every layer.

    NOTE: the first ``num_decode_tokens`` tokens of the step are one-token decodes, one per
    sequence; every other token belongs to exactly one ``QuerySpan``.
    """

    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot where each token's K/V is written
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [D, M] each decode's blocks, padded with block 0
    decode_mask: torch.Tensor | None  # [D, 1, 1, M * P] additive: 0 in context, -inf for padding
    spans: list[QuerySpan]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend each token to its sequence's context.

    q: [T, H, Dh]; k, v: [T, K, Dh]; kv_cache: [2, S, K, Dh] (mutated). Returns [T, H, Dh].
    """
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_blocks = k_cache.view(-1, meta.block_size, num_kv_heads, head_dim)  # [N, P, K, Dh]
    v_blocks = v_cache.view(-1, meta.block_size, num_kv_heads, head_dim)  # [N, P, K, Dh]
    out = torch.empty_like(q)

    num_decodes = meta.num_decode_tokens
    if num_decodes:
        tables = meta.decode_block_tables
        assert tables is not None
        context = tables.shape[1] * meta.block_size
        # The G query heads that share a kv head become G "query positions" of that head, so
        # GQA needs no repeat of K/V.
        qd = q[:num_decodes].view(num_decodes, num_kv_heads, -1, head_dim)  # [D, K, G, Dh]
        flat = tables.flatten()
        kd = k_blocks.index_select(0, flat).view(num_decodes, context, num_kv_heads, head_dim)
        vd = v_blocks.index_select(0, flat).view(num_decodes, context, num_kv_heads, head_dim)
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)  # [D, K, M * P, Dh]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:num_decodes] = od.reshape(num_decodes, num_heads, head_dim)

    for span in meta.spans:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
        n = span.context_len
        ks = k_blocks.index_select(0, span.block_ids).flatten(0, 1)[:n]  # [C, K, Dh]
        vs = v_blocks.index_select(0, span.block_ids).flatten(0, 1)[:n]  # [C, K, Dh]
        ks = ks.transpose(0, 1).unsqueeze(0)  # [1, K, C, Dh]
        vs = vs.transpose(0, 1).unsqueeze(0)  # [1, K, C, Dh]
        os_ = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[span.start : span.end] = os_[0].transpose(0, 1)
    return out


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Training path without a cache. q: [B, S, H, Dh]; k, v: [B, S, K, Dh] -> [B, S, H, Dh]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
