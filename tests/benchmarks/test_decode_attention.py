"""The decode-attention benchmark computes the same output three ways and times each."""

from __future__ import annotations

import torch

from benchmarks.decode_attention import run
from raycake.kernels import cpu_kernels


def test_three_ways_agree_and_are_timed():
    cpu_kernels.load()
    row = run(torch.float32, batch=3, context=40, repeats=3)
    for name in ("kernel", "inductor", "gather_sdpa"):
        assert row[f"{name}_max_err"] < 1e-5
        assert row[f"{name}_us"] > 0
    assert (row["dtype"], row["batch"], row["context"]) == ("float32", 3, 40)
