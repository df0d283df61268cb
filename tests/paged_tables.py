"""Block tables for paged-attention tests: each sequence its own blocks, in a shuffled order."""

from __future__ import annotations

import torch


def shuffled_block_tables(lengths: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """One table per sequence of ``lengths[i]`` tokens, from distinct shuffled blocks (so a bug
    that reads blocks in pool order, or another sequence's, shows)."""
    perm = torch.randperm(num_blocks).tolist()
    tables, start = [], 0
    for n in lengths:
        need = -(-n // block_size)
        tables.append(perm[start : start + need])
        start += need
    return tables
