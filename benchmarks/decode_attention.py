"""Decode attention over the paged KV cache on CPU: the C++ kernel against inductor's loops and
against the eager path's gather + SDPA, on the same inputs in one run.

    python -m benchmarks.decode_attention [--dtypes bfloat16 float32] [--batches 1 32]
        [--contexts 256 1024] [--repeats 200] [--threads 2]

Each row: B decodes of the embedded model's attention shape (4 query heads, 2 kv heads, head
dim 64), every context ``--contexts`` tokens long, its blocks scattered over a cache with room
for 4x the batch's blocks. Three ways to compute the same [B, H, Dh] output:
- ``kernel``: ``raycake_cpu::paged_decode_attention`` (``raycake.kernels.cpu_kernels``);
- ``inductor``: ``decode_graph.decode_attention`` compiled by ``torch.compile`` with dynamic
  batch and block counts, as the compiled decode ran it before the kernel;
- ``gather_sdpa``: each context's blocks gathered out of the cache, then SDPA (the eager path).
Microseconds per call are medians over ``--repeats`` calls, after warm-up; the ratios are the
baselines' time over the kernel's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine_columns, print_table, write_table
from raycake.kernels import cpu_kernels
from raycake.model.decode_graph import decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16


def gather_sdpa(q, k, v, kv_cache, block_tables, context_lens, block_size, scale):
    """The eager path's way: copy each context out of the cache, then SDPA over it."""
    rows = q.shape[0]
    blocks = kv_cache.view(2, -1, block_size, KV_HEADS, HEAD_DIM)
    cached = int(context_lens.max()) - 1
    keys = blocks[0][block_tables].view(rows, -1, KV_HEADS, HEAD_DIM)[:, :cached]
    values = blocks[1][block_tables].view(rows, -1, KV_HEADS, HEAD_DIM)[:, :cached]
    dtype = kv_cache.dtype
    keys = torch.cat([keys, k.to(dtype)[:, None]], dim=1).transpose(1, 2)  # [B, K, n, Dh]
    values = torch.cat([values, v.to(dtype)[:, None]], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.to(dtype)[:, :, None], keys, values, scale=scale, enable_gqa=True
    )
    return out[:, :, 0]


def median_us(fn, args, repeats: int) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def run(dtype: torch.dtype, batch: int, context: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    blocks_each = -(-context // BLOCK)
    num_blocks = 4 * batch * blocks_each
    cache = torch.randn(2, num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_each].view(batch, -1)
    lens = torch.full((batch,), context)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen)
    args = (q, k, v, cache, tables, lens, BLOCK, HEAD_DIM**-0.5)
    compiled = torch.compile(decode_attention, fullgraph=True)
    for tensor, dims in ((q, 0), (k, 0), (v, 0), (tables, (0, 1)), (lens, 0)):
        torch._dynamo.mark_dynamic(tensor, dims)
    want = gather_sdpa(*args).float()
    row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "context": context}
    for name, fn in (
        ("kernel", cpu_kernels.paged_decode_attention),
        ("inductor", compiled),
        ("gather_sdpa", gather_sdpa),
    ):
        with torch.inference_mode():
            err = (fn(*args).float() - want).abs().max().item()
            row[f"{name}_us"] = median_us(fn, args, repeats)
        row[f"{name}_max_err"] = err
    row["inductor_over_kernel"] = row["inductor_us"] / row["kernel_us"]
    row["gather_sdpa_over_kernel"] = row["gather_sdpa_us"] / row["kernel_us"]
    return row | machine_columns()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if min(args.batches) < 1 or min(args.contexts) < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("--batches, --repeats, --threads: >= 1; --contexts: >= 2")
    for name in args.dtypes:
        if getattr(torch, name, None) not in cpu_kernels.CACHE_DTYPES:
            parser.error(f"--dtypes: expected float32, bfloat16 or float16, got {name}")
    torch.set_num_threads(args.threads)
    cpu_kernels.load()
    rows = [
        run(getattr(torch, name), batch, context, args.repeats)
        for name in args.dtypes
        for batch in args.batches
        for context in args.contexts
    ]
    columns = ["dtype", "batch", "context", "kernel_us", "inductor_us", "gather_sdpa_us"]
    print_table(rows, [*columns, "inductor_over_kernel", "gather_sdpa_over_kernel"])
    print(f"saved {write_table(rows, 'decode_attention')}")


if __name__ == "__main__":
    main()
