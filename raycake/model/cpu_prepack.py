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

from raycake.kernels import cpu_kernels

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Layers up to this many weights take few-row calls to raycake's kernel rather than oneDNN:
# on the 2-core VM at 1-2 rows it took 7-16 us against oneDNN's 22-27 us for the embedded
# model's 256x256, 512x256 and 256x704 projections, but was even or slower for 1408x256
# (29.6 against 32.3 us, bf16, 2 rows) and 4096x256 (75.9 against 42.9 us).
SMALL_BATCH_MAX_WEIGHT = 256 * 1024


def packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    small_batch: bool,
) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` packed by ``torch.ops.mkldnn._reorder_linear_weight``, or
    with ``weight`` itself for a few rows when ``small_batch`` (see ``PrepackedLinear``)."""
    if small_batch and x.numel() <= cpu_kernels.SMALL_BATCH_MAX_ROWS * x.shape[-1]:
        return cpu_kernels.small_batch_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


# The same call as an opaque op for torch.compile (eager calls skip the op's dispatch cost).
prepacked_linear = torch.library.custom_op("raycake::prepacked_linear", mutates_args=())(
    packed_linear
)


@prepacked_linear.register_fake
def _prepacked_linear_shape(x, packed_weight, weight, bias, small_batch):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack weights of ``dtype`` on ``device``."""
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and dtype in PACKABLE_DTYPES
    )


class PrepackedLinear(nn.Module):
    """``nn.Linear`` for inference with its weight also held in oneDNN's layout.

    ``small_batch``: calls of at most ``SMALL_BATCH_MAX_ROWS`` rows go to raycake's own kernel
    (``kernels.cpu_kernels.small_batch_linear``, which must be loaded) instead of oneDNN,
    whose per-call setup dominates such calls on layers of up to ``SMALL_BATCH_MAX_WEIGHT``
    weights; bigger layers keep oneDNN, whose kernels win once there are bytes to stream.
    """

    def __init__(self, linear: nn.Linear, small_batch: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter: ties stay tied
        self.bias = linear.bias
        self.small_batch = small_batch and linear.weight.numel() <= SMALL_BATCH_MAX_WEIGHT
        with torch.no_grad():
            # None: one layout for every batch size (a batch-specific pack measured no faster).
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), None
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)  # training: the packed op has no autograd
        bias = None if self.bias is None else self.bias.detach()
        linear = prepacked_linear if torch.compiler.is_compiling() else packed_linear
        return linear(x, self.packed_weight, self.weight.detach(), bias, self.small_batch)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def prepack_linears(model: nn.Module, small_batch: bool = False) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` (CPU, fp32/bf16) for a ``PrepackedLinear``;
    return how many. Quantized and other custom layers are left alone. ``small_batch``: give
    small layers raycake's few-row kernel (built now; if it cannot be, oneDNN serves all)."""
    if small_batch and cpu_kernels.try_load() is not None:
        small_batch = False
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight
            if not can_prepack(weight.device, weight.dtype):
                continue
            setattr(parent, name, PrepackedLinear(child, small_batch=small_batch))
            swapped += 1
    return swapped
