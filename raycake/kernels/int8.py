"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 matmul with mixed-precision decomposition.

Legend: T tokens (rows of X), K input features, N output features, O outlier feature columns.

``y = x @ w.T`` with x [T, K] in 16/32-bit and w [N, K] stored as int8 codes plus one absmax scale
per output channel (the paper's "column-wise" scale of w viewed as [K, N]):

1. ``quantize_rows``: the outlier feature columns (any |x| >= threshold, a column-wise
   reduction), then each row of x to int8 by its own absmax over the other columns; outlier
   columns code as 0. As in the paper, a whole outlier column leaves the int8 part, so its
   moderate entries (|x| < threshold, still above the rest) do not coarsen the row's scale:
   bitsandbytes drops only the outlier elements from the absmax, and errs more (tests).
2. ``int8_scaled_mm``: int8 x int8 -> int32 GEMM, dequantized in its epilogue by
   ``row_scale * col_scale / 127**2`` (and bias). ``int8_mm`` is the same kernel, left in int32.
3. ``int8_mixed_mm``: the decomposition: the int8 product plus x[:, O] @ w[:, O].T in fp32
   (w's int8 rows dequantized; the float weight is gone), added in the GEMM's epilogue before
   the one cast to x's dtype.

Each op is a Triton kernel (``*_triton``) beside a torch reference of the same signature
(``*_torch``) and a dispatcher taking ``backend``: "auto" runs Triton on CUDA tensors and torch
elsewhere; "triton" on CPU tensors runs Triton's interpreter (see ``raycake.kernels``). The torch path is the CPU serving path: the int8 GEMM is
``torch._int_mm`` (exact, and faster than a bf16 matmul on CPUs with VNNI).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from raycake.kernels import launchable, tl, triton

Backend = Literal["auto", "torch", "triton"]
QMAX = 127  # int8 codes are in [-127, 127]: symmetric, -128 unused


class RowQuantized(NamedTuple):
    """x [T, K] quantized row by row, its outlier feature columns left out."""

    codes: torch.Tensor  # [T, K] int8: floor(x * 127 / scale + 0.5); 0 in outlier columns
    scales: torch.Tensor  # [T] fp32: each row's absmax over the columns that are not outliers
    outliers: torch.Tensor  # [K] bool: columns with any |x| >= threshold (none if threshold <= 0)


def use_triton(x: torch.Tensor, backend: Backend) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)


# ---------------------------------------------------------------- 1. row quantization + outliers


def quantize_rows_torch(x: torch.Tensor, threshold: float = 6.0) -> RowQuantized:
    _check_2d("x", x, floating=True)
    xf = x.float()  # [T, K]; no copy for fp32
    magnitude = xf.abs()  # [T, K]
    outliers = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)  # [K]
    if threshold > 0 and x.numel():
        outliers = magnitude.amax(0) >= threshold
    outlier_cols = outliers.nonzero().squeeze(1)  # [O]
    magnitude.index_fill_(1, outlier_cols, 0)
    scales = magnitude.amax(1) if x.shape[1] else magnitude.sum(1)  # [T]
    # NOTE: the same fp32 ops in the same order as the kernel, so the codes agree exactly.
    inverse = torch.where(scales > 0, QMAX / torch.where(scales > 0, scales, 1.0), 0.0)  # [T]
    codes = (xf * inverse[:, None]).add_(0.5).floor_().index_fill_(1, outlier_cols, 0)  # [T, K]
    return RowQuantized(codes.to(torch.int8), scales, outliers)


@triton.jit
def _outlier_columns_kernel(
    x_ptr, outliers_ptr,  # [T, K], [K] uint8
    T, K, stride_xt, stride_xk, threshold,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    col_ok = cols < K
    found = tl.zeros([BLOCK_K], dtype=tl.int32)
    for t in range(0, T, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)  # [BT]
        ok = (rows < T)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=ok, other=0)
        # fp32 before any arithmetic: the interpreter's bf16 is broken.
        is_outlier = tl.abs(x.to(tl.float32)) >= threshold  # [BT, BK]
        found = tl.maximum(found, tl.max(is_outlier.to(tl.int32), axis=0))
    tl.store(outliers_ptr + cols, found.to(tl.uint8), mask=col_ok)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, codes_ptr, scales_ptr, outliers_ptr,  # [T, K], [T, K], [T], [K] uint8
    T, K, stride_xt, stride_xk,
    HAS_OUTLIERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    row_ok = rows < T
    absmax = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # pass 1: each row's absmax over the ordinary columns
        cols = k + tl.arange(0, BLOCK_K)  # [BK]
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=ok, other=0)
        magnitude = tl.abs(x.to(tl.float32))  # [BT, BK]
        if HAS_OUTLIERS:
            is_outlier = tl.load(outliers_ptr + cols, mask=cols < K, other=0) != 0  # [BK]
            magnitude = tl.where(is_outlier[None, :], 0.0, magnitude)
        absmax = tl.maximum(absmax, tl.max(magnitude, axis=1))
    tl.store(scales_ptr + rows, absmax, mask=row_ok)
    qmax = tl.full([BLOCK_T], 127.0, tl.float32)  # QMAX
    nonzero = absmax > 0  # a row of zeros (or padding) codes as zeros
    inverse = tl.where(nonzero, tl.math.div_rn(qmax, tl.where(nonzero, absmax, 1.0)), 0.0)  # [BT]
    for k in range(0, K, BLOCK_K):  # pass 2: the codes
        cols = k + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=ok, other=0)
        codes = tl.floor(x.to(tl.float32) * inverse[:, None] + 0.5)  # [BT, BK]
        if HAS_OUTLIERS:
            is_outlier = tl.load(outliers_ptr + cols, mask=cols < K, other=0) != 0
            codes = tl.where(is_outlier[None, :], 0.0, codes)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], codes.to(tl.int8), mask=ok)


def quantize_rows_triton(x: torch.Tensor, threshold: float = 6.0) -> RowQuantized:
    _check_2d("x", x, floating=True)
    t, k = x.shape
    codes = torch.empty(t, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(t, dtype=torch.float32, device=x.device)
    outliers = torch.zeros(k, dtype=torch.uint8, device=x.device)
    block_t, block_k = 16, 128
    if threshold > 0:  # a column-wise reduction first: any row can make a column an outlier
        launchable(_outlier_columns_kernel, x)[(triton.cdiv(k, block_k),)](
            x, outliers, t, k, *x.stride(), float(threshold), BLOCK_T=block_t, BLOCK_K=block_k
        )
    launchable(_quantize_rows_kernel, x)[(triton.cdiv(t, block_t),)](
        x, codes, scales, outliers, t, k, *x.stride(),
        HAS_OUTLIERS=threshold > 0, BLOCK_T=block_t, BLOCK_K=block_k,
    )  # fmt: skip
    return RowQuantized(codes, scales, outliers.view(torch.bool))


def quantize_rows(
    x: torch.Tensor, threshold: float = 6.0, *, backend: Backend = "auto"
) -> RowQuantized:
    """x [T, K] (fp32/bf16/fp16) -> int8 codes, per-row scales and outlier columns."""
    if use_triton(x, backend):
        return quantize_rows_triton(x, threshold)
    return quantize_rows_torch(x, threshold)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline: w [N, K] -> (int8 codes [N, K], fp32 absmax per output channel [N])."""
    codes, scales, _ = quantize_rows_torch(weight.detach(), threshold=0.0)
    return codes, scales


# ----------------------------------------------- 2./3. int8 GEMM, dequantization, decomposition


def int8_mm_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [T, K] int8, b [N, K] int8 -> a @ b.T [T, N] int32, exact.

    On CPU the result is the transpose of a contiguous [N, T]: with b in nn.Linear's layout,
    oneDNN's int8 GEMM runs b @ a.T as fast as a @ b.T at 1 row and 1.2-5x faster at 2-512.
    """
    _check_gemm(a, b)
    if a.device.type == "cpu":
        return torch._int_mm(b, a.t()).t()
    # Elsewhere _int_mm wants T > 16 and multiples of 8; float64 is exact for any real K.
    return (a.double() @ b.double().t()).to(torch.int32)


def _scaled_mm_nt(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> torch.Tensor:
    """The dequantized product, transposed: [N, T] fp32 (contiguous on CPU, where it is cheaper
    to work in the GEMM's layout and transpose once, in the final cast)."""
    acc = int8_mm_torch(a, b).t()  # [N, T] int32
    return (acc * (b_scale[:, None] / QMAX**2)).mul_(a_scale)  # int32 * fp32 -> fp32


def _finish(
    out_nt: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    if bias is not None:
        out_nt.add_(bias.float()[:, None])
    # Cast, then transpose: a transposing copy is cheapest in the smaller, final dtype.
    return out_nt.to(out_dtype).t().contiguous()  # [T, N]


def int8_scaled_mm_torch(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(a * a_scale / 127) @ (b * b_scale / 127).T + bias: [T, N] in ``out_dtype``."""
    _check_gemm(a, b, a_scale, b_scale, bias)
    return _finish(_scaled_mm_nt(a, a_scale, b, b_scale), bias, out_dtype)


def int8_mixed_mm_torch(
    x: torch.Tensor,
    xq: RowQuantized,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, K] and its ``quantize_rows`` -> x @ w.T [T, N] in x's dtype, w = b * b_scale / 127;
    outlier columns in fp32, the rest in int8."""
    _check_mixed(x, xq, b, b_scale, bias)
    outlier_cols = xq.outliers.nonzero().squeeze(1)  # [O]
    out_nt = _scaled_mm_nt(xq.codes, xq.scales, b, b_scale)  # [N, T]
    if len(outlier_cols):  # the outlier columns' share, from w's int8 rows in fp32
        w_outliers = b.index_select(1, outlier_cols).float().mul_(b_scale[:, None] / QMAX)  # [N, O]
        out_nt.addmm_(w_outliers, x[:, outlier_cols].float().t())
    return _finish(out_nt, bias, x.dtype)


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, out_ptr,  # [T, K] int8, [N, K] int8, [T, N]
    a_scale_ptr, b_scale_ptr, bias_ptr,  # [T], [N], [N]
    outlier_cols_ptr, x_ptr,  # [O] outlier column ids, [T, K] float
    T, N, K, num_outliers,
    stride_at, stride_ak, stride_bn, stride_bk, stride_ot, stride_on, stride_xt, stride_xk,
    DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok, col_ok = rows < T, cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_at + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :], other=0,
        )  # [BT, BK]  # fmt: skip
        b = tl.load(
            b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
            mask=k_ok[:, None] & col_ok[None, :], other=0,
        )  # [BK, BN]  # fmt: skip
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    out_ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on
    out_ok = row_ok[:, None] & col_ok[None, :]
    if DEQUANT:
        a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)  # [BT]
        b_scale = tl.load(b_scale_ptr + cols, mask=col_ok, other=0.0)  # [BN]
        out = acc.to(tl.float32) * a_scale[:, None] * (b_scale / 16129.0)[None, :]  # QMAX**2
        if HAS_OUTLIERS:
            exact = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for o in range(0, num_outliers, BLOCK_O):
                slots = o + tl.arange(0, BLOCK_O)
                o_ok = slots < num_outliers
                ks = tl.load(outlier_cols_ptr + slots, mask=o_ok, other=0)  # [BO]
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & o_ok[None, :], other=0,
                ).to(tl.float32)  # [BT, BO]  # fmt: skip
                w = tl.load(
                    b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=o_ok[:, None] & col_ok[None, :], other=0,
                ).to(tl.float32)  # [BO, BN]  # fmt: skip
                exact = tl.dot(x, w, exact, input_precision="ieee")
            out += exact * (b_scale / 127.0)[None, :]  # QMAX
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out_ptrs, acc, mask=out_ok)


def _launch_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    xq: RowQuantized | None = None,
) -> torch.Tensor:
    (t, k), n = a.shape, b.shape[0]
    outlier_cols = None if xq is None else xq.outliers.nonzero().squeeze(1).to(torch.int32)
    has_outliers = outlier_cols is not None and len(outlier_cols) > 0
    block_t = 16 if t <= 16 else 64
    dummy = out  # stands in for pointers a constexpr flag leaves unread
    x_strides = x.stride() if has_outliers else (0, 0)
    grid = (triton.cdiv(t, block_t), triton.cdiv(n, 64))
    launchable(_int8_matmul_kernel, a)[grid](
        a, b, out,
        dummy if a_scale is None else a_scale, dummy if b_scale is None else b_scale,
        dummy if bias is None else bias,
        outlier_cols if has_outliers else dummy, x if has_outliers else dummy,
        t, n, k, len(outlier_cols) if has_outliers else 0,
        *a.stride(), *b.stride(), *out.stride(), *x_strides,
        DEQUANT=a_scale is not None, HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers,
        BLOCK_T=block_t, BLOCK_N=64, BLOCK_K=64, BLOCK_O=16,
    )  # fmt: skip
    return out


def int8_mm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_gemm(a, b)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return _launch_matmul(a, b, out)


def int8_scaled_mm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    _check_gemm(a, b, a_scale, b_scale, bias)
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return _launch_matmul(a, b, out, a_scale, b_scale, bias)


def int8_mixed_mm_triton(
    x: torch.Tensor,
    xq: RowQuantized,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_mixed(x, xq, b, b_scale, bias)
    out = torch.empty(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
    return _launch_matmul(xq.codes, b, out, xq.scales, b_scale, bias, x, xq)


def int8_mm(a: torch.Tensor, b: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """a [T, K] int8, b [N, K] int8 -> a @ b.T [T, N] int32."""
    return (int8_mm_triton if use_triton(a, backend) else int8_mm_torch)(a, b)


def int8_scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """The int8 GEMM dequantized by row and column absmax scales, plus bias: [T, N]."""
    fn = int8_scaled_mm_triton if use_triton(a, backend) else int8_scaled_mm_torch
    return fn(a, a_scale, b, b_scale, bias, out_dtype)


def int8_mixed_mm(
    x: torch.Tensor,
    xq: RowQuantized,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """LLM.int8()'s decomposition: int8 for most columns, fp32 for the outliers: [T, N]."""
    fn = int8_mixed_mm_triton if use_triton(x, backend) else int8_mixed_mm_torch
    return fn(x, xq, b, b_scale, bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """F.linear with an int8 weight [N, K] and its scales [N]: x [..., K] -> [..., N]."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # [T, K]
    xq = quantize_rows(x, threshold, backend=backend)
    out = int8_mixed_mm(x, xq, weight, weight_scale, bias, backend=backend)  # [T, N]
    return out.view(*lead, out.shape[-1])


# ---------------------------------------------------------------------------- checks


def _check_2d(name: str, x: torch.Tensor, floating: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if floating and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: expected float32, bfloat16 or float16, got {x.dtype}")


def _check_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    for name, m in (("a", a), ("b", b)):
        _check_2d(name, m, floating=False)
        if m.dtype != torch.int8:
            raise ValueError(f"{name}: expected int8 codes, got {m.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} differ in K")
    for name, t in (("b", b), ("a_scale", a_scale), ("b_scale", b_scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device}, a on {a.device}")
    for name, s, size in (("a_scale", a_scale, a.shape[0]), ("b_scale", b_scale, b.shape[0])):
        if s is not None and (s.shape != (size,) or s.dtype != torch.float32):
            raise ValueError(f"{name}: expected float32 [{size}], got {s.dtype} {tuple(s.shape)}")
    if bias is not None and bias.shape != (b.shape[0],):
        raise ValueError(f"bias: expected [{b.shape[0]}], got {tuple(bias.shape)}")


def _check_mixed(
    x: torch.Tensor,
    xq: RowQuantized,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    _check_2d("x", x, floating=True)
    _check_gemm(xq.codes, b, xq.scales, b_scale, bias)
    if x.shape != xq.codes.shape or xq.outliers.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} does not match its quantization")
