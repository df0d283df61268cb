"""Paged decode attention in groups of similar context length, against dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raycake.kernels import cpu_kernels
from raycake.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    decode_group_bounds,
    paged_attention,
)
from tests.paged_tables import shuffled_block_tables


@pytest.mark.parametrize(
    ("counts", "bounds"),
    [
        ([], []),
        ([3], [(0, 1)]),
        ([1, 1, 2, 3, 4, 5, 9], [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]),
        ([8, 8, 8], [(0, 3)]),
        ([1, 64], [(0, 1), (1, 2)]),
    ],
)
def test_decode_groups_share_a_power_of_two_bucket(counts, bounds):
    assert decode_group_bounds(counts) == bounds


@pytest.mark.parametrize("kernel", [False, True])
def test_grouped_decodes_equal_dense_attention_per_sequence(kernel):
    """A batch of decodes with one long context: each sequence's output is its own dense
    attention over exactly its context, whatever the group it landed in; in gather + SDPA, or
    in raycake's CPU kernel when the group carries its context lengths."""
    torch.manual_seed(0)
    block_size, num_blocks, heads, kv_heads, head_dim = 4, 64, 4, 2, 64
    if kernel:
        cpu_kernels.load()
    lengths = [3, 5, 6, 40]  # tokens of context, the new one included
    cache = torch.randn(2, num_blocks * block_size, kv_heads, head_dim)
    tables = shuffled_block_tables(lengths, block_size, num_blocks)
    counts = [len(t) for t in tables]
    groups = []
    for lo, hi in decode_group_bounds(counts):
        width = max(counts[lo:hi])
        rows = torch.tensor([t + [0] * (width - len(t)) for t in tables[lo:hi]])
        blocked = torch.arange(width * block_size)[None, :] >= torch.tensor(lengths[lo:hi])[:, None]
        mask = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))[:, None, None, :]
        lens = torch.tensor(lengths[lo:hi]) if kernel else None
        groups.append(DecodeGroup(lo, hi, rows, mask, lens))
    assert [(g.start, g.end) for g in groups] == [(0, 1), (1, 3), (3, 4)]  # 1; 2, 2; 10 blocks
    slots = [
        t[(n - 1) // block_size] * block_size + (n - 1) % block_size
        for t, n in zip(tables, lengths, strict=True)
    ]
    meta = AttentionMetadata(block_size, torch.tensor(slots), len(lengths), groups, spans=[])
    q = torch.randn(len(lengths), heads, head_dim)
    k = torch.randn(len(lengths), kv_heads, head_dim)
    v = torch.randn(len(lengths), kv_heads, head_dim)
    scale = head_dim**-0.5
    out = paged_attention(q, k, v, cache, meta, scale)
    for i, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        token_slots = [table[j // block_size] * block_size + j % block_size for j in range(n)]
        keys = cache[0, token_slots].transpose(0, 1)  # [K, n, Dh], the new token's K written
        values = cache[1, token_slots].transpose(0, 1)
        torch.testing.assert_close(keys[:, -1], k[i])
        want = F.scaled_dot_product_attention(
            q[i][:, None],
            keys.repeat_interleave(heads // kv_heads, 0),
            values.repeat_interleave(heads // kv_heads, 0),
            scale=scale,
        )[:, 0]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
