"""LLM.int8() matmul: raycake's int8 path against fp32 and bf16 torch matmuls and bitsandbytes,
in time and in error against the fp32 product, all in the same run; then the embedded model's
weight memory in fp32, bf16 and int8.

    python -m benchmarks.int8_matmul [--shapes 1x4096x4096 16x4096x4096 ...] [--repeats 5]
                                     [--rounds 3] [--threads N]

Shapes are tokens x in x out: x [T, K] holds planted outlier features (6 feature dimensions of
magnitude 8-60 in ~75% of tokens, as LLM.int8() found in large models), w [N, K] is N(0, 1/K).
On CPU raycake runs its torch path (int8 GEMM by ``torch._int_mm``); on CUDA the Triton kernels,
against cuBLAS. Rows: the median over ``rounds`` of the median of ``repeats`` calls, variants
taking turns within a round so load from other work hits them alike; ``vs_bf16`` and
``vs_fp32`` are time ratios against those rows of the same shape (below 1 is faster), and
``error_%`` is 100 ||y - y_fp32|| / ||y_fp32||. bitsandbytes runs ``Linear8bitLt`` in eval mode
(in training mode it silently runs in float) at threshold 6.0, quantizing x at every call as
raycake does; "no decomposition" is raycake at threshold 0.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import median_seconds, print_table, write_table
from raycake.kernels.int8 import int8_linear, quantize_weight

SHAPES = ["1x4096x4096", "16x4096x4096", "512x4096x4096", "512x4096x14336"]


def planted_outliers(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    cols = torch.randperm(features, generator=g)[:6]
    magnitude = torch.tensor([8.0, -12.0, 20.0, -30.0, 45.0, 60.0])
    rows = torch.rand(tokens, 6, generator=g) < 0.75
    x[:, cols] = torch.where(
        rows, magnitude * (1 + 0.2 * torch.randn(tokens, 6, generator=g)), x[:, cols]
    )
    return x


def bitsandbytes_linear(weight: torch.Tensor, threshold: float) -> torch.nn.Module | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    n, k = weight.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(
        weight.cpu().clone(), requires_grad=False, has_fp16_weights=False
    )
    return layer.to(weight.device).eval()


def variants(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a call computing x @ w.T its way (weights prepared once, outside the timing)."""
    xb, wb = x.bfloat16(), w.bfloat16()
    codes, scales = quantize_weight(w)
    fns = {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "raycake int8 (fp32 x)": lambda: int8_linear(x, codes, scales),
        "raycake int8 (bf16 x)": lambda: int8_linear(xb, codes, scales),
        "raycake int8, no decomposition": lambda: int8_linear(x, codes, scales, threshold=0.0),
    }
    bnb = bitsandbytes_linear(w, 6.0)
    if bnb is not None:
        fns["bitsandbytes int8 (fp32 x)"] = lambda: bnb(x)
        fns["bitsandbytes int8 (bf16 x)"] = lambda: bnb(xb)
    return fns


def projection_bytes(model: torch.nn.Module) -> int:
    """Bytes of what int8 replaces: the attention and MLP projections (with their scales)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for name, tensor in model.state_dict().items()
        if "_proj" in name
    )


def weight_memory() -> list[dict]:
    """The embedded model's weight bytes in each form (int8: the projections; embeddings, which
    lm_head shares, and norms stay in the base dtype)."""
    from raycake.bench import weight_bytes
    from raycake.model.int8_linear import quantize_model
    from raycake.model.loader import load_model, resolve_model_path

    path = resolve_model_path("default")
    fp32 = load_model(path, "float32")
    fp32_bytes, fp32_projections = weight_bytes(fp32), projection_bytes(fp32)
    rows = []
    for name, dtype, int8 in [
        ("fp32", "float32", False),
        ("bf16", "bfloat16", False),
        ("int8 + fp32 rest", "float32", True),
        ("int8 + bf16 rest", "bfloat16", True),
    ]:
        model = load_model(path, dtype)
        if int8:
            quantize_model(model)
        total, projections = weight_bytes(model), projection_bytes(model)
        rows.append(
            {
                "weights": name,
                "MiB": total / 2**20,
                "vs_fp32": total / fp32_bytes,
                "projections_MiB": projections / 2**20,
                "projections_vs_fp32": projections / fp32_projections,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    rows = []
    with torch.inference_mode():
        for shape in args.shapes:
            t, k, n = (int(part) for part in shape.split("x"))
            x = planted_outliers(t, k).to(device)
            w = (torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * k**-0.5).to(device)
            fns = variants(x, w)
            expected = fns["fp32"]().double()
            errors = {
                name: float((fn().double() - expected).norm() / expected.norm())
                for name, fn in fns.items()
            }
            samples: dict[str, list[float]] = defaultdict(list)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    seconds = median_seconds(lambda fn=fn: (fn(), sync()), args.repeats)
                    samples[name].append(1000 * seconds)
            ms = {name: statistics.median(values) for name, values in samples.items()}
            for name in fns:
                rows.append(
                    {
                        "shape": shape,
                        "variant": name,
                        "ms": ms[name],
                        "vs_bf16": ms[name] / ms["bf16"],
                        "vs_fp32": ms[name] / ms["fp32"],
                        "error_%": 100 * errors[name],
                    }
                )
            print(f"{shape} done", flush=True)
    print_table(rows, ["shape", "variant", "ms", "vs_bf16", "vs_fp32", "error_%"])
    print(f"saved {write_table(rows, 'int8_matmul')}")
    memory = weight_memory()
    print("\nembedded model (default) weight memory:")
    print_table(memory, list(memory[0]))
    print(f"saved {write_table(memory, 'int8_memory')}")


if __name__ == "__main__":
    main()
