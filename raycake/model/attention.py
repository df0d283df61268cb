"""Attention over a paged KV cache for a flattened batch of decodes and prefill chunks.

Legend: T tokens in the step, H query heads, K kv heads, G = H / K, Dh head dim,
S cache slots (N blocks x P tokens per block), M most blocks of a decode, C one span's context.

Context is read a whole block at a time (``index_select`` of P x K x Dh rows), which is an
order of magnitude faster on CPU than gathering slot by slot.

Spans of the same short length that carry a mask (speculative verify spans: a request's last
token and its draft tree) are batched into one attention call per layer, their contexts padded
to the longest and masked, the way decodes are; other spans run one call each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raycake.kernels import cpu_kernels


@dataclass
class DecodeGroup:
    """Decode tokens ``start:end`` of the step, attended in one call: their contexts are padded
    only to the longest in the group, not in the whole batch, so one long request does not make
    every decode gather and attend over its length."""

    start: int
    end: int
    block_tables: torch.Tensor  # [d, M] each decode's blocks, padded with block 0
    # One of the two: [d, 1, 1, M * P] additive mask (0 in context, -inf for padding) for
    # gather + SDPA; or [d] each decode's context length, its own token included, for raycake's
    # CPU attention kernel, which reads only those positions.
    mask: torch.Tensor | None
    context_lens: torch.Tensor | None = None


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
    # The decodes in groups of similar context length, in token order (see DecodeGroup).
    decode_groups: list[DecodeGroup]
    spans: list[QuerySpan]
    # Built on first use and shared by every layer of the step: batched spans, and the rest.
    _plan: tuple[list[SpanBatch], list[QuerySpan]] | None = field(default=None, repr=False)

    def span_plan(self) -> tuple[list[SpanBatch], list[QuerySpan]]:
        if self._plan is None:
            self._plan = _plan_spans(self.spans, self.block_size)
        return self._plan


def decode_group_bounds(block_counts: list[int]) -> list[tuple[int, int]]:
    """Split decodes sorted by how many blocks they read (ascending) into ``(start, end)`` groups
    whose counts share a power-of-two bucket: each group pads to at most twice a member's
    length, and a batch needs at most log2(longest) attention calls."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(block_counts) + 1):
        if i == len(block_counts) or _bucket(block_counts[i]) != _bucket(block_counts[start]):
            bounds.append((start, i))
            start = i
    return bounds


def _bucket(num_blocks: int) -> int:
    return max(num_blocks - 1, 0).bit_length()


# Spans at most this long are batched: verify spans are (1 + draft nodes) tokens; a prompt
# chunk, whose padding would cost more than its own call, runs alone.
MAX_BATCHED_SPAN = 64


@dataclass
class SpanBatch:
    """R masked spans of n tokens each, attended in one call. B = R x n tokens."""

    token_index: torch.Tensor  # [B] the spans' tokens in the step, span after span
    span_len: int  # n
    block_tables: torch.Tensor  # [R, M] each span's blocks, padded with block 0
    mask: torch.Tensor  # [R, 1, n, M * P] additive; -inf beyond each span's context


def _plan_spans(spans: list[QuerySpan], block_size: int) -> tuple[list[SpanBatch], list[QuerySpan]]:
    groups: dict[int, list[QuerySpan]] = {}
    single: list[QuerySpan] = []
    for span in spans:
        n = span.end - span.start
        if span.mask is None or n > MAX_BATCHED_SPAN:
            single.append(span)
        else:
            groups.setdefault(n, []).append(span)
    batches = []
    for n, members in groups.items():
        if len(members) == 1:
            single.extend(members)
            continue
        max_blocks = max(len(s.block_ids) for s in members)
        device = members[0].block_ids.device
        tables = torch.zeros(len(members), max_blocks, dtype=torch.long, device=device)
        mask = torch.full(
            (len(members), 1, n, max_blocks * block_size),
            float("-inf"),
            dtype=members[0].mask.dtype,
            device=members[0].mask.device,
        )
        for r, span in enumerate(members):
            tables[r, : len(span.block_ids)] = span.block_ids
            mask[r, 0, :, : span.context_len] = span.mask
        index = torch.cat([torch.arange(s.start, s.end, device=device) for s in members])
        batches.append(SpanBatch(index, n, tables, mask))
    return batches, single


def _with_sinks(
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend the persistent-memory keys and values (visible to every query) to a context.

    k, v: [R, K, L, Dh]; mask: [..., L] additive; sinks: ([K, Np, Dh], [K, Np, Dh]).
    """
    if sinks is None:
        return k, v, mask
    sink_k, sink_v = sinks
    lead = k.shape[0]
    k = torch.cat([sink_k.to(k.dtype).expand(lead, -1, -1, -1), k], dim=2)
    v = torch.cat([sink_v.to(v.dtype).expand(lead, -1, -1, -1), v], dim=2)
    visible = mask.new_zeros(*mask.shape[:-1], sink_k.shape[1])
    return k, v, torch.cat([visible, mask], dim=-1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend each token to its sequence's context.

    q: [T, H, Dh]; k, v: [T, K, Dh]; kv_cache: [2, S, K, Dh] (mutated). Returns [T, H, Dh].
    ``sinks``: persistent-memory K/V attended by every query (Titans); a sliding window is
    the runner's: it lists only the window's blocks and masks the rest.
    """
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # K and V of the same blocks are gathered together: one index_select instead of two.
    kv_blocks = kv_cache.view(2, -1, meta.block_size, num_kv_heads, head_dim)  # [2, N, P, K, Dh]
    out = torch.empty_like(q)

    for group in meta.decode_groups:
        if group.context_lens is not None:
            # The kernel reads the context where it lies; this step's K/V, just written to
            # the cache, also come as its own rows (in fp32, as the kernel computes).
            rows = slice(group.start, group.end)
            out[rows] = cpu_kernels.paged_decode_attention(
                q[rows].float(),
                k[rows].float(),
                v[rows].float(),
                kv_cache,
                group.block_tables,
                group.context_lens,
                meta.block_size,
                scale,
            )
            continue
        assert group.mask is not None, "a decode group gathered for SDPA needs its mask"
        num_decodes = group.end - group.start
        context = group.block_tables.shape[1] * meta.block_size
        # The G query heads that share a kv head become G "query positions" of that head, so
        # GQA needs no repeat of K/V.
        qd = q[group.start : group.end].view(
            num_decodes, num_kv_heads, -1, head_dim
        )  # [d, K, G, Dh]
        flat = group.block_tables.flatten()
        kvd = kv_blocks.index_select(1, flat).view(2, num_decodes, context, num_kv_heads, head_dim)
        kd, vd = kvd[0], kvd[1]
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)  # [d, K, M * P, Dh]
        kd, vd, mask = _with_sinks(kd, vd, group.mask, sinks)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        out[group.start : group.end] = od.reshape(num_decodes, num_heads, head_dim)

    batches, single = meta.span_plan()
    for batch in batches:
        num_spans, n = batch.block_tables.shape[0], batch.span_len
        context = batch.block_tables.shape[1] * meta.block_size
        qb = q.index_select(0, batch.token_index).view(num_spans, n, num_heads, head_dim)
        flat = batch.block_tables.flatten()
        kvb = kv_blocks.index_select(1, flat).view(2, num_spans, context, num_kv_heads, head_dim)
        kb, vb = kvb[0], kvb[1]
        kb, vb, mask = _with_sinks(kb.transpose(1, 2), vb.transpose(1, 2), batch.mask, sinks)
        ob = F.scaled_dot_product_attention(
            qb.transpose(1, 2),  # [R, H, n, Dh]
            kb,  # [R, K, (Np +) M * P, Dh]
            vb,
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # [R, H, n, Dh]
        out.index_copy_(0, batch.token_index, ob.transpose(1, 2).reshape(-1, num_heads, head_dim))

    for span in single:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, Dh]
        n = span.context_len
        kvs = kv_blocks.index_select(1, span.block_ids).flatten(1, 2)[:, :n]  # [2, C, K, Dh]
        ks, vs = kvs[0], kvs[1]
        ks = ks.transpose(0, 1).unsqueeze(0)  # [1, K, C, Dh]
        vs = vs.transpose(0, 1).unsqueeze(0)  # [1, K, C, Dh]
        mask = span.mask
        if sinks is not None:
            assert mask is not None, "persistent tokens need an explicit mask"
            ks, vs, mask = _with_sinks(ks, vs, mask, sinks)
        os_ = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[span.start : span.end] = os_[0].transpose(0, 1)
    return out


def window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """[n, C] additive mask: query i sees key j iff ``q_i - window < k_j <= q_i``."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    blocked = (k > q) | (k <= q - window)
    zeros = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return zeros.masked_fill_(blocked, float("-inf"))


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Training path without a cache. q: [B, S, H, Dh]; k, v: [B, S, K, Dh] -> [B, S, H, Dh].

    ``window``: each query sees its last ``window`` positions; ``sinks``: persistent K/V.
    """
    if window is not None or sinks is not None:
        positions = torch.arange(q.shape[1], device=q.device)
        mask = window_mask(positions, positions, window or q.shape[1], q.dtype)  # [S, S]
        keys, values, mask = _with_sinks(k.transpose(1, 2), v.transpose(1, 2), mask, sinks)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
