"""raycake's CPU kernels against float64 references (decode attention over each sequence's
gathered context; the few-row linear), and their refusals."""

from __future__ import annotations

import pytest
import torch

from raycake.kernels import cpu_kernels
from raycake.model.decode_graph import decode_attention

BLOCK = 16
NUM_BLOCKS = 80


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    cpu_kernels.load()


def make_inputs(lens, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = len(lens)
    max_blocks = max(-(-(n - 1) // BLOCK) for n in lens) + 1  # one spare: padding columns
    cache = torch.randn(2, NUM_BLOCKS * BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    # Each sequence's blocks are scattered over the cache, none shared; padding is block 0.
    ids = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1)[: rows * max_blocks]
    tables = ids.view(rows, max_blocks).clone()
    for b, n in enumerate(lens):
        tables[b, -(-(n - 1) // BLOCK) :] = 0
    q = torch.randn(rows, heads, head_dim, generator=gen)
    k = torch.randn(rows, kv_heads, head_dim, generator=gen)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen)
    return q, k, v, cache, tables, torch.tensor(lens)


def reference(q, k, v, cache, tables, lens, scale):
    """Softmax attention per sequence over its gathered cached positions then its own k/v."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = []
    for b, n in enumerate(lens.tolist()):
        slots = [int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(n - 1)]
        keys = torch.cat([cache[0, slots].double(), k[b : b + 1].double()])  # [n, K, D]
        values = torch.cat([cache[1, slots].double(), v[b : b + 1].double()])
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (8, 2, 128), (2, 2, 64)])
def test_matches_float64_attention_over_the_gathered_context(dtype, tol, heads, kv_heads, head_dim):
    # Lengths include the decode's own token: 1 (nothing cached), block edges, partial blocks.
    lens = [1, 2, BLOCK, BLOCK + 1, 2 * BLOCK + 1, 37, 100]
    q, k, v, cache, tables, lens_t = make_inputs(lens, heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = cpu_kernels.paged_decode_attention(q, k, v, cache, tables, lens_t, BLOCK, scale)
    assert out.dtype == dtype and out.shape == (len(lens), heads, head_dim)
    expected = reference(q, k, v, cache, tables, lens_t, scale)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # And the torch formulation the compiled graph uses elsewhere agrees with it.
    torch.testing.assert_close(
        out.float(),
        decode_attention(q, k, v, cache, tables, lens_t, BLOCK, scale).float(),
        rtol=tol,
        atol=tol,
    )


def test_padding_columns_and_foreign_blocks_are_never_read():
    lens = [5, 20]
    q, k, v, cache, tables, lens_t = make_inputs(lens, 4, 2, 64, torch.float32)
    out = cpu_kernels.paged_decode_attention(q, k, v, cache, tables, lens_t, BLOCK, 0.125)
    # Poison every slot that is not some sequence's context: the result must not move.
    used = torch.zeros(NUM_BLOCKS * BLOCK, dtype=torch.bool)
    for b, n in enumerate(lens):
        for p in range(n - 1):
            used[int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK] = True
    poisoned = cache.clone()
    poisoned[:, ~used] = float("nan")
    again = cpu_kernels.paged_decode_attention(q, k, v, poisoned, tables, lens_t, BLOCK, 0.125)
    assert torch.equal(out, again)


def test_bad_inputs_fail_with_the_field_named():
    q, k, v, cache, tables, lens = make_inputs([3, 9], 4, 2, 64, torch.float32)
    op = cpu_kernels.paged_decode_attention
    with pytest.raises(RuntimeError, match="block_tables: block id 999 outside"):
        op(q, k, v, cache, torch.full_like(tables, 999), lens, BLOCK, 0.125)
    with pytest.raises(RuntimeError, match="context_lens: expected 1 to"):
        op(q, k, v, cache, tables, torch.tensor([3, 10_000]), BLOCK, 0.125)
    with pytest.raises(RuntimeError, match="context_lens: expected 1 to"):
        op(q, k, v, cache, tables, torch.tensor([0, 9]), BLOCK, 0.125)
    with pytest.raises(RuntimeError, match="q, k, v: expected float32"):
        op(q.bfloat16(), k, v, cache, tables, lens, BLOCK, 0.125)
    with pytest.raises(RuntimeError, match=r"k, v: expected \[B, K, D\] each"):
        op(q, k[:1], v[:1], cache, tables, lens, BLOCK, 0.125)
    q80, k80, v80, cache80, tables80, lens80 = make_inputs([3], 2, 2, 80, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim: expected 64, 128 or 256, got 80"):
        op(q80, k80, v80, cache80, tables80, lens80, BLOCK, 0.125)


def test_attention_unsupported_reason():
    cpu = torch.device("cpu")
    assert cpu_kernels.attention_unsupported_reason(64, torch.bfloat16, cpu) is None
    assert "head_dim 80" in cpu_kernels.attention_unsupported_reason(80, torch.float32, cpu)
    assert "float64" in cpu_kernels.attention_unsupported_reason(64, torch.float64, cpu)
    assert "cuda" in cpu_kernels.attention_unsupported_reason(
        64, torch.float32, torch.device("cuda")
    )


def test_rows_sliced_from_one_tensor_read_as_their_copies():
    """The compiled graph passes q, k and v as slices of one [B, H + 2K, D] tensor."""
    q, k, v, cache, tables, lens = make_inputs([7, 30, 50], 4, 2, 64, torch.bfloat16)
    rows = torch.cat([q, k, v], dim=1)
    sliced = rows[:, :4], rows[:, 4:6], rows[:, 6:]
    assert not sliced[0].is_contiguous()
    got = cpu_kernels.paged_decode_attention(*sliced, cache, tables, lens, BLOCK, 0.125)
    want = cpu_kernels.paged_decode_attention(q, k, v, cache, tables, lens, BLOCK, 0.125)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_matches_float64(dtype, rows, bias):
    # 50 inputs: a tail after the vector chunks; 83 outputs: a tail after the blocks of 4.
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 50, generator=gen).to(dtype)
    weight = torch.randn(83, 50, generator=gen).to(dtype)
    b = torch.randn(83, generator=gen).to(dtype) if bias else None
    got = cpu_kernels.small_batch_linear(x, weight, b)
    want = x.double() @ weight.double().T + (0 if b is None else b.double())
    assert got.shape == (rows, 83) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_small_batch_linear_takes_leading_dims_and_refuses_more_rows():
    x, weight = torch.randn(2, 2, 64), torch.randn(32, 64)
    torch.testing.assert_close(
        cpu_kernels.small_batch_linear(x, weight, None), x @ weight.T, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(RuntimeError, match="x: expected at most 4 rows, got 5"):
        cpu_kernels.small_batch_linear(torch.randn(5, 64), weight, None)
    with pytest.raises(RuntimeError, match="expected both float32 or both bfloat16"):
        cpu_kernels.small_batch_linear(torch.randn(1, 64), weight.bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias: expected"):
        cpu_kernels.small_batch_linear(torch.randn(1, 64), weight, torch.randn(7))


def test_without_a_build_the_engine_keeps_onednn_and_the_torch_attention(monkeypatch):
    """A machine where the kernels cannot be built (no compiler) still serves, as before."""
    from raycake.assets import default_model_dir
    from raycake.engine.runner import ModelRunner
    from raycake.model.cpu_prepack import PrepackedLinear, prepack_linears
    from raycake.model.decode_graph import pick_attention
    from raycake.model.loader import load_model

    monkeypatch.setattr(cpu_kernels, "try_load", lambda: "the CPU kernels did not build: no g++")
    model = load_model(default_model_dir())
    assert prepack_linears(model, small_batch=True) == 17
    assert not any(m.small_batch for m in model.modules() if isinstance(m, PrepackedLinear))
    assert pick_attention(model, torch.float32) is decode_attention
    assert ModelRunner(model, block_size=BLOCK, num_blocks=8).decode_kernel is False
    monkeypatch.undo()
    assert ModelRunner(model, block_size=BLOCK, num_blocks=8).decode_kernel is True
