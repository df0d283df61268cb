"""raycake's C++ kernels for CPU (``kernels/cpu/*.cpp``), built on first use.

Two places where neither oneDNN nor inductor's generated loops serve a CPU decode step well:

- ``paged_decode_attention``: decode attention over the paged KV cache.
  ``decode_graph.decode_attention`` compiled by inductor reads each context block in place,
  but its loops recompute the block lookup and a bounds check per position and element
  chunk, reduce one head at a time, and load each cached row once per query head: 0.25 ms a
  layer for 32 bf16 decodes of ~200 tokens on a 2-core VM, about a fifth of the step. The
  kernel does the same arithmetic with ATen's SIMD types: per sequence and kv head, each
  cached row is loaded and converted to fp32 once and used by the G query heads that share
  it, the accumulators stay in registers, the softmax is one vectorised pass, and the
  next block is prefetched (blocks lie anywhere in the cache).
- ``small_batch_linear``: ``x @ W.T + b`` for 1-4 rows. oneDNN's matmul costs 22-25 us a
  call at such shapes whatever their size (its per-call setup), most of a small model's
  linear time at one request; the kernel streams W in its own layout in 7-16 us for the
  embedded model's projections of up to 256K weights (``cpu_prepack`` uses it there).

vLLM's CPU backend has kernels of both kinds too, and the compiled decode already needs a C++
compiler for inductor. The ops are ``torch.ops.raycake_cpu.*``, opaque to ``torch.compile``.
``load()`` builds them with ``torch.utils.cpp_extension`` for the machine's SIMD level (ATen's
``CPU_CAPABILITY``: AVX-512, AVX2, or portable code), once per machine: the build (10-20 s)
is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
HEAD_DIMS = (64, 128, 256)
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_BATCH_MAX_ROWS = 4  # the kernel's limit: more rows go to oneDNN

# Compiler flags per ATen CPU capability: the macro selects ATen's vector types, the flags let
# the compiler emit those instructions (the set ATen's own kernels of that level use).
_CAPABILITY_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512dq",
        "-mavx512vl",
        "-mavx512bw",
        "-mfma",
        "-mf16c",
    ],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def attention_unsupported_reason(
    head_dim: int, cache_dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why ``paged_decode_attention`` cannot serve this model and cache (None: it can, and
    the kernels are loaded now)."""
    if device.type != "cpu":
        return f"the kernel runs on CPU tensors, not {device.type}"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {HEAD_DIMS}"
    if cache_dtype not in CACHE_DTYPES:
        return f"KV cache dtype {cache_dtype} is not one of {CACHE_DTYPES}"
    return try_load()


@functools.cache
def load() -> None:
    """Build (or take from the build cache) and load the kernels, once per process; raises
    RuntimeError with the compiler's output when they cannot be built."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", *_CAPABILITY_FLAGS.get(capability, [])]
    ldflags = []
    if torch.backends.openmp.is_available():  # at::parallel_for is OpenMP in torch's builds
        flags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cpp_extension.load(
        name=f"raycake_cpu_kernels_{capability.lower()}",
        sources=[str(source) for source in SOURCES],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        is_python_module=False,
    )

    # The ops' schemas are defined in C++ (TORCH_LIBRARY_FRAGMENT); their shape functions are
    # here so that torch.compile can trace them.
    @torch.library.register_fake("raycake_cpu::paged_decode_attention")
    def _(q, k, v, kv_cache, block_tables, context_lens, block_size, scale):
        return q.new_empty(q.shape, dtype=kv_cache.dtype)

    @torch.library.register_fake("raycake_cpu::small_batch_linear")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    logger.info("raycake_cpu kernels loaded (%s)", capability)


@functools.cache
def try_load() -> str | None:
    """``load()``; the reason when it failed (no compiler, or it refused), else None."""
    try:
        load()
    except (RuntimeError, OSError) as exc:
        logger.warning("raycake_cpu kernels did not build, so they are not used: %s", exc)
        return f"the CPU kernels did not build: {exc}"
    return None


def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Each decode attends its cached context and its own new K/V (``decode_attention``'s
    contract).

    q: [B, H, Dh] fp32; k, v: [B, K, Dh] fp32 (this step's, not yet in the cache; each row's
    heads packed, rows may be strided); kv_cache: [2, S, K, Dh] contiguous, fp32/bf16/fp16;
    block_tables: [B, M] int64; context_lens: [B] int64, the decode's own token included
    (positions at or past ``context_lens - 1`` in the table are not read). Returns [B, H, Dh]
    in the cache's dtype. Call ``load()`` first.
    """
    return torch.ops.raycake_cpu.paged_decode_attention(
        q, k, v, kv_cache, block_tables, context_lens, block_size, scale
    )


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for x of at most ``SMALL_BATCH_MAX_ROWS`` rows ([..., in]), all
    fp32 or all bf16, accumulated in fp32. Call ``load()`` first."""
    return torch.ops.raycake_cpu.small_batch_linear(x, weight, bias)
