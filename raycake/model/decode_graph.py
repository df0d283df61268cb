"""A decode step compiled with ``torch.compile``: every layer's small ops fused by inductor.

At serving sizes a decode step on CPU is about 150 small operator calls (RMSNorm, RoPE,
SiLU-mul, residual adds, casts), each a few microseconds of dispatch, and at many requests
a gather of every context's K/V out of the paged cache before attention. Compiled, the small
ops become a few fused loops, the linears stay oneDNN's prepacked matmuls (opaque calls, see
``cpu_prepack``), and attention reads each context block where it lies in the cache: the
gather, scores, softmax and weighted sum are index arithmetic inside inductor's loops, with no
gathered copy of the context.

Legend: B decodes in the step, M blocks per decode (padded), P tokens per block,
H query heads, K kv heads, G = H / K, Dh head dim, L layers.

The graph is a pure function: it reads the cache and returns each layer's new K/V, which the
caller writes into the cache after it (``write_new_kv``). An in-graph write into a view of the
cache made inductor copy the whole cache every step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from raycake.kernels import cpu_kernels
from raycake.model.cpu_prepack import PrepackedLinear
from raycake.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

logger = logging.getLogger(__name__)

# The compiled graph sees at least this many decodes and context blocks: dynamic shapes
# specialise sizes 0 and 1, so smaller steps are padded up instead of compiling more graphs.
MIN_ROWS = 2
MIN_BLOCKS = 2


def unsupported_reason(model: LlamaForCausalLM) -> str | None:
    """Why the compiled decode cannot run ``model`` (None: it can)."""
    config = model.config
    if config.titans is not None:
        return "Titans models update a memory state every step"
    for layer in model.model.layers:
        if type(layer) is not LlamaDecoderLayer or type(layer.mlp) is not LlamaMLP:
            return "only dense Llama layers are compiled (not MoE or custom layers)"
        if layer.self_attn.persistent_kv is not None or layer.self_attn.sliding_window:
            return "persistent-memory tokens and sliding windows are not compiled"
        linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj)
        linears += (layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if any(type(linear) not in (nn.Linear, PrepackedLinear) for linear in linears):
            return "only plain and prepacked linears are compiled (not int8)"
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Each decode attends its cached context and its own new K/V.

    q: [B, H, Dh]; k, v: [B, K, Dh] (this step's, not yet in the cache, in the cache's dtype or
    fp32); kv_cache: [2, S, K, Dh];
    block_tables: [B, M]; context_lens: [B], the decode's own token included. Cached positions
    at or past ``context_lens - 1`` are masked (padding, or the slot this step's K/V goes to).
    Returns [B, H, Dh] in the cache's dtype.

    Written as broadcasts and reductions, not SDPA over a gathered copy: compiled, the block
    lookup is index arithmetic in the loops that read K and V. In fp32 throughout.
    """
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    blocks = kv_cache.view(2, -1, block_size, num_kv_heads, head_dim)  # [2, N, P, K, Dh]
    keys = blocks[0][block_tables].view(rows, -1, num_kv_heads, 1, head_dim)  # [B, M*P, K, 1, Dh]
    values = blocks[1][block_tables].view(rows, -1, num_kv_heads, 1, head_dim)
    qf = q.float().view(rows, 1, num_kv_heads, group, head_dim)  # [B, 1, K, G, Dh]
    # NOTE: scaled after the sum, once per score: scaling q inside the loops measured 20-30%
    # slower (inductor recomputes it for every context position).
    cached = (qf * keys.float()).sum(-1) * scale  # [B, M*P, K, G]
    past = torch.arange(cached.shape[1], device=q.device)
    cached = cached.masked_fill(
        past[None, :, None, None] >= (context_lens - 1)[:, None, None, None], float("-inf")
    )
    own = (qf * k.float().view(rows, 1, num_kv_heads, 1, head_dim)).sum(-1) * scale  # [B,1,K,G]
    probs = torch.softmax(torch.cat([cached, own], dim=1), dim=1)  # [B, M*P + 1, K, G]
    out = (probs[:, :-1, :, :, None] * values.float()).sum(1)  # [B, K, G, Dh]
    out = out + probs[:, -1, :, :, None] * v.float().view(rows, num_kv_heads, 1, head_dim)
    return out.to(kv_cache.dtype).view(rows, num_heads, head_dim)


def pick_attention(
    model: LlamaForCausalLM, cache_dtype: torch.dtype
) -> Callable[..., torch.Tensor]:
    """The CPU kernel (``kernels.cpu_kernels``) where it serves this model, built now; else
    ``decode_attention``, which inductor compiles (into Triton on CUDA)."""
    device = model.model.embed_tokens.weight.device
    head_dim = model.model.layers[0].self_attn.head_dim
    reason = cpu_kernels.attention_unsupported_reason(head_dim, cache_dtype, device)
    if reason is None:
        return cpu_kernels.paged_decode_attention
    if device.type == "cpu":
        logger.warning("compile_decode: CPU attention kernel not used (%s)", reason)
    return decode_attention


def decode_forward(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    kv_caches: list[torch.Tensor],
    block_size: int,
    attention: Callable[..., torch.Tensor] = decode_attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per row through every layer: (final hidden [B, E], new rows
    [L, B, H + 2K, Dh] in fp32: each layer's rotated q, then k and v, which go into the cache).
    ``attention`` has ``decode_attention``'s signature (or is the CPU kernel of that contract)."""
    inner = model.model
    x = inner.embed_tokens(input_ids)  # [B, E]
    cos, sin = inner.rotary_emb(positions, x.dtype)
    new_rows = []
    for layer, kv_cache in zip(inner.layers, kv_caches, strict=True):
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(x), cos, sin)
        # NOTE: the rows are a graph output, so inductor stores them once and the attention
        # loads them; left inline, RoPE was recomputed for every context position (3x slower).
        # In fp32, as attention computes: converted once here, not at every position (15-25%
        # faster attention); the cache's dtype holds k and v exactly, so nothing is lost.
        rows = torch.cat([q, k, v], dim=1).float()  # [B, H + 2K, Dh]
        new_rows.append(rows)
        q, k, v = rows.split([attn.num_heads, attn.num_kv_heads, attn.num_kv_heads], dim=1)
        out = attention(q, k, v, kv_cache, block_tables, context_lens, block_size, attn.scale)
        x = x + attn.o_proj(out.reshape(x.shape[0], attn.q_size))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return inner.norm(x), torch.stack(new_rows)


def write_new_kv(
    kv_caches: list[torch.Tensor], new_rows: torch.Tensor, slots: torch.Tensor, num_heads: int
) -> None:
    """Write each layer's new K/V rows ([L, B, H + 2K, Dh] from ``decode_forward``) to ``slots``
    (one per row; only the first ``len(slots)`` rows are real)."""
    num_kv_heads = (new_rows.shape[2] - num_heads) // 2
    real = new_rows[:, : slots.shape[0], num_heads:].to(kv_caches[0].dtype)  # [L, B, 2K, Dh]
    for layer, kv_cache in enumerate(kv_caches):
        kv = real[layer].view(-1, 2, num_kv_heads, real.shape[-1])
        kv_cache[:, slots] = kv.transpose(0, 1)


class CompiledDecode:
    """``decode_forward`` compiled once with dynamic batch and context sizes.

    ``warm_up`` picks the attention (the CPU kernel where it serves) and compiles it (the
    runner calls it when it is built): tens of seconds on a small CPU; inductor caches the
    result on disk for later processes. Steps with fewer than ``MIN_ROWS`` decodes or
    ``MIN_BLOCKS`` blocks are padded up to them, so one graph serves every step.
    """

    def __init__(self, model: LlamaForCausalLM, block_size: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"compile_decode: {reason}")
        self.model = model
        self.block_size = block_size
        self.num_heads = model.config.num_attention_heads
        self.attention: Callable[..., torch.Tensor] | None = None
        self._forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.inference_mode()
    def warm_up(self, kv_caches: list[torch.Tensor]) -> None:
        """Pick the attention for these caches and compile now, on padding rows only (nothing
        is written to the cache), so that a machine that cannot compile fails at start-up
        rather than in a request's step."""
        self.attention = pick_attention(self.model, kv_caches[0].dtype)
        # Only the sizes marked below are dynamic (rows, blocks); weights and caches are
        # static, so every step after this one runs the one graph.
        # NOTE: inductor's wrapper otherwise checks the size and stride of every extern call's
        # result (55 checks a step here, 1% of a 32-request bf16 step); the graph is fixed.
        self._forward = torch.compile(
            functools.partial(decode_forward, attention=self.attention),
            fullgraph=True,
            options={"size_asserts": False, "alignment_asserts": False},
        )
        device = kv_caches[0].device
        # Padding rows only; rows and blocks differ in number so that they get a size
        # variable each (equal sizes would share one, and a later step would recompile).
        ids = torch.zeros(MIN_ROWS, dtype=torch.long, device=device)
        positions = torch.zeros(MIN_ROWS, dtype=torch.long, device=device)
        tables = torch.zeros(MIN_ROWS, MIN_BLOCKS + 1, dtype=torch.long, device=device)
        lens = torch.ones(MIN_ROWS, dtype=torch.long, device=device)
        for tensor, dims in ((ids, 0), (positions, 0), (tables, (0, 1)), (lens, 0)):
            torch._dynamo.mark_dynamic(tensor, dims)
        self._forward(self.model, ids, positions, tables, lens, kv_caches, self.block_size)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run the step and write its K/V: final hidden states [B, E] of the B real rows."""
        if self._forward is None:
            raise RuntimeError("CompiledDecode: call warm_up(kv_caches) before the first step")
        rows = input_ids.shape[0]
        input_ids, positions, block_tables, context_lens = pad_decode_inputs(
            input_ids, positions, block_tables, context_lens
        )
        hidden, new_rows = self._forward(
            self.model, input_ids, positions, block_tables, context_lens, kv_caches, self.block_size
        )
        write_new_kv(kv_caches, new_rows, slots, self.num_heads)
        return hidden[:rows]


def pad_decode_inputs(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to ``MIN_ROWS`` rows and ``MIN_BLOCKS`` blocks: padding rows decode token 0 at
    position 0 over block 0 with nothing cached (their output is dropped), padding blocks are
    block 0 past every context (masked)."""
    rows, blocks = block_tables.shape
    extra_rows, extra_blocks = max(MIN_ROWS - rows, 0), max(MIN_BLOCKS - blocks, 0)
    if extra_rows == 0 and extra_blocks == 0:
        return input_ids, positions, block_tables, context_lens
    block_tables = torch.nn.functional.pad(block_tables, (0, extra_blocks, 0, extra_rows))
    input_ids = torch.nn.functional.pad(input_ids, (0, extra_rows))
    positions = torch.nn.functional.pad(positions, (0, extra_rows))
    context_lens = torch.nn.functional.pad(context_lens, (0, extra_rows), value=1)
    return input_ids, positions, block_tables, context_lens
