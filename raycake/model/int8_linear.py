"""LLM.int8() serving: the model's linear layers with int8 weights, swapped in after loading.

Legend: T tokens, K input features, N output features; for experts E experts, H hidden size,
I expert intermediate size.

Each weight is quantized once, per output channel (absmax over K), and kept as int8 codes plus
one fp32 scale per channel: a quarter of its fp32 bytes, half of bf16. Activations are
quantized per row at every call, their outlier feature columns (|x| >= threshold) running in
fp32 instead (``raycake.kernels.int8``). ``quantize_model`` swaps every projection of attention
and the MLP / experts; embeddings, lm_head, norms and the MoE router stay in float
("selective precision": the router's E columns cost little and decide where tokens go).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycake.kernels.int8 import QMAX, Backend, int8_linear, quantize_weight
from raycake.model.llama import LlamaAttention, LlamaMLP
from raycake.model.moe import FusedExperts, MoEFeedForward, combine, plan_dispatch

DEFAULT_THRESHOLD = 6.0  # the paper's outlier magnitude


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight [N, K] and an fp32 absmax scale per output channel [N].

    NOTE: the scales stay fp32 even if the module is later cast (``forward`` reads them as
    fp32); cast the model to its serving dtype before quantizing, not after.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        dtype: torch.dtype = torch.float32,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold
        self.backend = backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, backend: Backend = "auto"
    ) -> Int8Linear:
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            threshold=threshold,
            dtype=weight.dtype,
            backend=backend,
        ).to(weight.device)
        module.weight, module.weight_scale = quantize_weight(weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the int8 codes stand for, [N, K] fp32 (for tests and error reports)."""
        return self.weight.float() * (self.weight_scale.float()[:, None] / QMAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (fp32, bf16 or fp16) -> [..., N] in x's dtype."""
        return int8_linear(
            x,
            self.weight,
            self.weight_scale.float(),
            None if self.bias is None else self.bias.to(x.dtype),
            self.threshold,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )


class Int8FusedExperts(nn.Module):
    """``FusedExperts`` with int8 weights: the same buffers' shapes and ``forward`` /
    ``run_grouped`` contracts, so ``MoEFeedForward`` (and an expert shard) runs it unchanged.

    gate_up_proj [E, 2I, H] and down_proj [E, H, I] int8, each with fp32 scales per expert and
    output channel: gate_up_scale [E, 2I], down_scale [E, H].
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        threshold: float = DEFAULT_THRESHOLD,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.threshold = threshold
        self.backend = backend
        e, h, i = num_experts, hidden_size, intermediate_size
        self.register_buffer("gate_up_proj", torch.zeros(e, 2 * i, h, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.ones(e, 2 * i))
        self.register_buffer("down_proj", torch.zeros(e, h, i, dtype=torch.int8))
        self.register_buffer("down_scale", torch.ones(e, h))

    @classmethod
    def from_experts(
        cls, experts: FusedExperts, threshold: float = DEFAULT_THRESHOLD, backend: Backend = "auto"
    ) -> Int8FusedExperts:
        e, two_i, h = experts.gate_up_proj.shape
        module = cls(e, h, two_i // 2, threshold, backend).to(experts.gate_up_proj.device)
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name).detach()  # [E, out, in]
            codes, scales = quantize_weight(weight.reshape(-1, weight.shape[-1]))
            setattr(module, name, codes.view(weight.shape))
            setattr(module, name.replace("_proj", "_scale"), scales.view(weight.shape[:2]))
        return module

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; expert_indices, gates, kept [T, k] -> sum_j gate_j * expert_j(x) [T, H]."""
        plan = plan_dispatch(expert_indices, kept, self.num_experts)
        out = self.run_grouped(x[plan.tokens], plan.counts)  # [N, H]
        return combine(x, plan, gates, out)

    def run_grouped(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """grouped [N, H] sorted by expert, ``counts[e]`` rows for expert e -> [N, H]."""
        out = torch.empty_like(grouped)  # [N, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            h = self._linear(grouped[start:end], "gate_up", expert)  # [n, 2I]
            gate, up = h.split(self.intermediate_size, dim=-1)  # [n, I] each
            out[start:end] = self._linear(F.silu(gate) * up, "down", expert)  # [n, H]
            start = end
        return out

    def _linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        weight = getattr(self, f"{name}_proj")[expert]
        scale = getattr(self, f"{name}_scale")[expert].float()
        return int8_linear(x, weight, scale, None, self.threshold, backend=self.backend)


def quantize_model(
    model: nn.Module, threshold: float = DEFAULT_THRESHOLD, backend: Backend = "auto"
) -> nn.Module:
    """Swap, in place, every attention and MLP projection (qkv_proj, o_proj, gate_up_proj,
    down_proj) for an ``Int8Linear`` and every ``FusedExperts`` for ``Int8FusedExperts``;
    returns ``model``. Embeddings, lm_head (tied or not), norms and routers are left as they
    are. Run it on a loaded model in its serving dtype; the float weights it replaces are freed.
    """
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            names = ("qkv_proj", "o_proj")
        elif isinstance(module, LlamaMLP):
            names = ("gate_up_proj", "down_proj")
        elif isinstance(module, MoEFeedForward) and isinstance(module.experts, FusedExperts):
            module.experts = Int8FusedExperts.from_experts(module.experts, threshold, backend)
            continue
        else:
            continue
        for name in names:
            linear = getattr(module, name)
            if isinstance(linear, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(linear, threshold, backend))
    return model
