"""Linear layers whose weights are prepacked for oneDNN, for serving on CPU.

``F.linear`` on CPU reorders the weight into oneDNN's blocked layout on every call (bf16) or
runs a generic GEMM (fp32); at serving batch sizes that reorder costs as much as the multiply.
Packing once at load, as vLLM's CPU backend and inductor's ``freezing`` do, measured 1.3-2.7x
faster per bf16 projection of the embedded model at 1 and 32 rows, and 1.4-2.1x for fp32 at 32
rows (2-core VM, one process).

The original weight stays the module's ``weight`` parameter: tied embeddings, EAGLE's draft
rows of the lm_head and checkpoint export read it. The packed copy is an opaque oneDNN tensor,
held as a plain attribute so ``state_dict`` and ``Module.to`` never see it; it costs one more
copy of each packed weight's bytes. Inference only: the packed op has no autograd.

Under ``torch.compile`` the packed call is the custom op ``raycake::prepacked_linear``: inductor
cannot trace oneDNN's packed linear itself, and as an opaque call the compiled graph keeps
oneDNN's matmul (and its packed weight) while inductor fuses the small ops around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("raycake::prepacked_linear", mutates_args=())
def prepacked_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` packed by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@prepacked_linear.register_fake
def _prepacked_linear_shape(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack weights of ``dtype`` on ``device``."""
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and dtype in PACKABLE_DTYPES
    )


class PrepackedLinear(nn.Module):
    """``nn.Linear`` for inference with its weight also held in oneDNN's layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter: ties stay tied
        self.bias = linear.bias
        with torch.no_grad():
            # None: one layout for every batch size (a batch-specific pack measured no faster).
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), None
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)  # training: the packed op has no autograd
        bias = None if self.bias is None else self.bias.detach()
        if torch.compiler.is_compiling():
            return prepacked_linear(x, self.packed_weight, bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` (CPU, fp32/bf16) for a ``PrepackedLinear``;
    return how many. Quantized and other custom layers are left alone."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight
            if not can_prepack(weight.device, weight.dtype):
                continue
            setattr(parent, name, PrepackedLinear(child))
            swapped += 1
    return swapped
