"""The compiled decode step: its attention against dense attention, its forward against the
eager model's, and the engine's tokens with it on against off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raycake import LLM, SamplingParams
from raycake.assets import default_model_dir, default_moe_model_dir, default_titans_model_dir
from raycake.engine.config import EngineConfig, SpeculativeConfig
from raycake.kernels import cpu_kernels
from raycake.model.attention import AttentionMetadata, DecodeGroup
from raycake.model.decode_graph import (
    CompiledDecode,
    decode_attention,
    pad_decode_inputs,
    unsupported_reason,
)
from raycake.model.loader import load_model
from tests.paged_tables import shuffled_block_tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_dense_attention_per_sequence(dtype):
    """Mixed context lengths, GQA, padded tables: each row is its own dense attention over
    exactly its cached context plus its new K/V (which is not in the cache yet)."""
    torch.manual_seed(0)
    block_size, num_blocks, heads, kv_heads, head_dim = 4, 48, 4, 2, 8
    lengths = [1, 3, 6, 21]  # tokens of context, the new one included
    cache = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, dtype=dtype)
    tables = shuffled_block_tables(lengths, block_size, num_blocks)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), heads, head_dim, dtype=dtype)
    k = torch.randn(len(lengths), kv_heads, head_dim, dtype=dtype)
    v = torch.randn(len(lengths), kv_heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    out = decode_attention(q, k, v, cache, block_tables, torch.tensor(lengths), block_size, scale)
    assert out.shape == q.shape and out.dtype == dtype
    for i, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        slots = [table[j // block_size] * block_size + j % block_size for j in range(n - 1)]
        keys = torch.cat([cache[0, slots], k[i][None]]).float().transpose(0, 1)  # [K, n, Dh]
        values = torch.cat([cache[1, slots], v[i][None]]).float().transpose(0, 1)
        want = F.scaled_dot_product_attention(
            q[i].float()[:, None],
            keys.repeat_interleave(heads // kv_heads, 0),
            values.repeat_interleave(heads // kv_heads, 0),
            scale=scale,
        )[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[i].float(), want, rtol=tol, atol=tol)


def test_padding_adds_rows_with_nothing_cached_and_masked_blocks():
    ids, pos, tables, lens = pad_decode_inputs(
        torch.tensor([7]), torch.tensor([3]), torch.tensor([[5]]), torch.tensor([4])
    )
    assert ids.tolist() == [7, 0] and pos.tolist() == [3, 0]
    assert tables.tolist() == [[5, 0], [0, 0]] and lens.tolist() == [4, 1]
    # Already large enough: the same tensors back.
    big = torch.zeros(3, 2, dtype=torch.long)
    assert pad_decode_inputs(big[:, 0], big[:, 0], big, big[:, 0])[2] is big


def test_models_the_graph_does_not_cover_say_why():
    assert unsupported_reason(load_model(default_model_dir())) is None
    assert "Titans" in unsupported_reason(load_model(default_titans_model_dir()))
    assert "MoE" in unsupported_reason(load_model(default_moe_model_dir()))
    int8 = load_model(default_model_dir(), quantization="int8")
    assert "int8" in unsupported_reason(int8)
    with pytest.raises(ValueError, match=r"compile_decode: .*int8"):
        CompiledDecode(int8, block_size=16)


def test_config_rejects_compile_decode_with_speculation_or_a_non_bool():
    with pytest.raises(ValueError, match="compile_decode: expected true or false"):
        EngineConfig(compile_decode=1)
    with pytest.raises(ValueError, match="compile_decode: expected false when speculative"):
        EngineConfig(
            compile_decode=True,
            speculative=SpeculativeConfig(method="eagle", draft_model="default"),
        )


@pytest.fixture(scope="module")
def engines():
    """The embedded model in fp32, compiled and eager (one compile for the module's tests)."""
    compiled = LLM(compile_decode=True, enable_prefix_caching=False)
    eager = LLM(enable_prefix_caching=False)
    calls = []
    inner = compiled.engine.runner.compiled_decode
    assert inner is not None

    def counted(*args):
        calls.append(args[0].shape[0])
        return inner(*args)

    compiled.engine.runner.compiled_decode = counted
    yield compiled, eager, calls, inner
    compiled.engine.runner.compiled_decode = inner


def _prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(2, 4000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(
    ("lengths", "compiled_steps"),
    [
        ([5], 24),  # one decode: padded to two rows, and to two blocks while it fits in one
        ([5, 40, 70], 24),  # mixed lengths, padded to the longest (at most 2x its blocks)
        ([3, 3, 200], 0),  # padding would triple the blocks read: the eager path runs
    ],
)
def test_compiled_decode_gives_the_eager_engines_greedy_tokens(engines, lengths, compiled_steps):
    compiled, eager, calls, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    calls.clear()
    # Every batch and context size runs the graph compiled when the engine was built.
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled.generate(_prompts(lengths), params)
    want = eager.generate(_prompts(lengths), params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # The first token comes from the prefill; the other 24 from decode steps.
    assert len(calls) == compiled_steps
    assert all(rows == len(lengths) for rows in calls)


def test_compiled_forward_matches_the_eager_forward(engines):
    """Final hidden states of one decode step, compiled against the eager model, fp32."""
    compiled, _, _, graph = engines
    # On CPU the graph's attention is the C++ kernel (built on first use), not inductor's loops.
    assert graph.attention is cpu_kernels.paged_decode_attention
    model = compiled.engine.model
    torch.manual_seed(1)
    block_size, lengths = 16, [9, 17, 33]
    num_blocks = 12
    config = model.config
    caches = [
        torch.randn(2, num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        for _ in range(config.num_hidden_layers)
    ]
    tables = shuffled_block_tables(lengths, block_size, num_blocks)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    positions = torch.tensor([n - 1 for n in lengths])
    slots = torch.tensor(
        [
            t[p // block_size] * block_size + p % block_size
            for t, p in zip(tables, positions.tolist(), strict=True)
        ]
    )
    ids = torch.randint(0, config.vocab_size, (len(lengths),))
    blocked = torch.arange(width * block_size)[None, :] >= torch.tensor(lengths)[:, None]
    mask = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))[:, None, None, :]
    meta = AttentionMetadata(
        block_size, slots, len(lengths), [DecodeGroup(0, 3, block_tables, mask)], []
    )
    eager_caches = [c.clone() for c in caches]
    with torch.inference_mode():
        want = model(ids, positions, meta, eager_caches)
        got = graph(ids, positions, slots, block_tables, torch.tensor(lengths), caches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The step's K/V went into the same slots as the eager forward's.
    for mine, theirs in zip(caches, eager_caches, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
