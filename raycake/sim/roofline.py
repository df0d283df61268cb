"""A roofline of one serving instance (GPU x tensor parallelism x model shape) for the simulator.

Step time = fixed overhead + max(compute, memory traffic) + tensor-parallel communication:
- prefill of n new tokens after c cached ones: linear GEMM flops (2 x active parameters per
  token) plus quadratic attention flops (4 x heads x head_dim per query-key pair), against
  reading the weights once and the cached KV;
- a decode step over a batch: reading the weights (the experts the batch touches, for MoE) and
  the batch's whole KV context, against the batch's flops;
- KV moves at KV bytes / link bandwidth (RDMA between instances and the store).

The policies consume a ``StepCostModel`` (fixed + linear + attention terms), so
``RooflineCostModel.step_cost_model()`` fits one to roofline samples over the operating range,
the same ``StepCostModel.fit`` that calibrates it from a real engine's measured steps. The
simulator times steps with that fitted model, so its predictions and the policies' agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from raycake.policies.step_cost_model import (
    DecodeSample,
    PrefillSample,
    StepCostModel,
    attention_work,
)
from raycake.sim.hardware import (
    GB,
    GPU_PRESETS,
    MODEL_PRESETS,
    GpuSpec,
    ModelShape,
    gpu_preset,
    model_preset,
)

__all__ = [
    "GPU_PRESETS",
    "MODEL_PRESETS",
    "GpuSpec",
    "ModelShape",
    "RooflineCostModel",
    "gpu_preset",
    "model_preset",
]


@dataclass(frozen=True, kw_only=True)
class RooflineCostModel:
    """Step times of one instance: ``gpu`` x ``tensor_parallel`` running ``model``.

    ``mfu`` and ``bandwidth_efficiency`` are the shares of peak FLOP/s and HBM bandwidth real
    kernels reach; ``link_efficiency`` that of the RDMA links (Mooncake measured 87 of 100 GB/s
    on 4 x 200 Gbps); ``step_overhead_s`` covers launch and scheduling per forward pass, and
    ``allreduce_latency_s`` each of the two tensor-parallel all-reduces per layer.
    """

    gpu: GpuSpec
    model: ModelShape
    tensor_parallel: int = 1
    mfu: float = 0.5
    bandwidth_efficiency: float = 0.8
    link_efficiency: float = 0.8
    step_overhead_s: float = 0.002
    allreduce_latency_s: float = 10e-6

    def __post_init__(self) -> None:
        tp = self.tensor_parallel
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel: expected an integer >= 1, got {tp!r}")
        for name in ("mfu", "bandwidth_efficiency", "link_efficiency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")
        for name in ("step_overhead_s", "allreduce_latency_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")

    # --- Rates of the whole instance -------------------------------------------------------

    @property
    def flops_per_s(self) -> float:
        return self.gpu.bf16_flops * self.tensor_parallel * self.mfu

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.tensor_parallel * self.bandwidth_efficiency

    @property
    def transfer_bandwidth_bytes_per_s(self) -> float:
        """KV bytes/s into or out of the instance: every GPU's NIC carries its shard."""
        return self.gpu.rdma_bytes_per_s * self.tensor_parallel * self.link_efficiency

    @property
    def weight_bytes(self) -> int:
        return self.model.num_params * self.model.dtype_bytes

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of one KV block of ``block_size`` tokens (RequestView.store_block_bytes)."""
        return self.model.kv_bytes_per_token * block_size

    def kv_capacity_blocks(self, block_size: int, gpu_memory_utilization: float = 0.9) -> int:
        """KV blocks that fit in HBM beside the weights (vLLM's gpu_memory_utilization)."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization: expected a number in (0, 1], got {gpu_memory_utilization}"
            )
        free = self.gpu.hbm_bytes * self.tensor_parallel * gpu_memory_utilization
        free -= self.weight_bytes
        if free < self.kv_block_bytes(block_size):
            raise ValueError(
                f"tensor_parallel: {self.model.name} ({self.weight_bytes / GB:.0f} GB of weights) "
                f"leaves no room for KV on {self.tensor_parallel} x {self.gpu.name} "
                f"({self.gpu.hbm_bytes / GB:.0f} GB each); raise tensor_parallel"
            )
        return int(free // self.kv_block_bytes(block_size))

    # --- Roofline step times ---------------------------------------------------------------

    def _allreduce_seconds(self, num_tokens: float) -> float:
        """Two ring all-reduces of the hidden state per layer (attention and MLP outputs)."""
        tp = self.tensor_parallel
        if tp == 1:
            return 0.0
        per_reduce = num_tokens * self.model.hidden_size * self.model.dtype_bytes
        ring_bytes = 2 * (tp - 1) / tp * per_reduce
        num_reduces = 2 * self.model.num_layers
        return num_reduces * (self.allreduce_latency_s + ring_bytes / self.gpu.nvlink_bytes_per_s)

    def _expert_weight_bytes(self, num_tokens: float) -> float:
        """Weights a forward pass over ``num_tokens`` tokens reads: every dense weight, and per
        MoE layer the experts at least one token routes to (uniform routing expected)."""
        model = self.model
        # The input embedding is a row lookup, not a streamed matrix (unless tied to lm_head).
        streamed = model.num_params - (0 if model.tie_word_embeddings else model.lm_head_params)
        if model.num_experts:
            all_experts = model.num_moe_layers * model.num_experts * model.mlp_params
            untouched_share = (1 - model.experts_per_token / model.num_experts) ** num_tokens
            streamed -= all_experts * untouched_share
        return streamed * model.dtype_bytes

    def prefill_seconds(self, num_new_tokens: int, num_cached_tokens: int) -> float:
        """One prefill pass: superlinear in length through the attention term."""
        if num_new_tokens < 0 or num_cached_tokens < 0:
            raise ValueError(
                f"prefill_seconds: expected token counts >= 0, got {num_new_tokens}, "
                f"{num_cached_tokens}"
            )
        if num_new_tokens == 0:
            return 0.0
        model = self.model
        flops = (
            2 * model.active_layer_params * num_new_tokens
            + 2 * model.lm_head_params  # logits of the last token only
            + model.attention_flops_per_pair * attention_work(num_new_tokens, num_cached_tokens)
        )
        traffic = self._expert_weight_bytes(num_new_tokens) + model.kv_bytes_per_token * (
            num_cached_tokens + num_new_tokens
        )
        return (
            self.step_overhead_s
            + max(flops / self.flops_per_s, traffic / self.hbm_bytes_per_s)
            + self._allreduce_seconds(num_new_tokens)
        )

    def decode_step_seconds(self, batch_size: float, total_context_tokens: float) -> float:
        """One decode step: memory-bound (weights + the batch's KV) until the batch is large."""
        if batch_size < 0 or total_context_tokens < 0:
            raise ValueError(
                f"decode_step_seconds: expected values >= 0, got {batch_size}, "
                f"{total_context_tokens}"
            )
        if batch_size == 0:
            return 0.0
        model = self.model
        flops = (
            2 * (model.active_layer_params + model.lm_head_params) * batch_size
            + model.attention_flops_per_pair * total_context_tokens
        )
        traffic = (
            self._expert_weight_bytes(batch_size) + model.kv_bytes_per_token * total_context_tokens
        )
        return (
            self.step_overhead_s
            + max(flops / self.flops_per_s, traffic / self.hbm_bytes_per_s)
            + self._allreduce_seconds(batch_size)
        )

    def mixed_step_seconds(
        self,
        prefill_chunks: Sequence[tuple[int, int]],
        decode_batch: int,
        decode_context_tokens: int,
    ) -> float:
        """One forward pass over prefill chunks ((new, cached) tokens each) and a decode batch
        (one token per sequence), as chunked prefill batches them on a coupled instance: flops
        and KV reads add up, but the weights are read once for every token of the pass, so a
        memory-bound decode batch rides along a compute-bound chunk almost for free while the
        chunk stretches the step every decode token waits for.

        NOTE: with no decode batch this is ``prefill_seconds`` of the one chunk; with no chunks
        it is ``decode_step_seconds``."""
        model = self.model
        num_tokens = decode_batch + sum(n for n, _ in prefill_chunks)
        if num_tokens == 0:
            return 0.0
        flops = model.attention_flops_per_pair * decode_context_tokens
        kv_tokens = decode_context_tokens
        if decode_batch:
            flops += 2 * (model.active_layer_params + model.lm_head_params) * decode_batch
        for num_new, num_cached in prefill_chunks:
            flops += (
                2 * model.active_layer_params * num_new
                + 2 * model.lm_head_params
                + model.attention_flops_per_pair * attention_work(num_new, num_cached)
            )
            kv_tokens += num_cached + num_new
        traffic = self._expert_weight_bytes(num_tokens) + model.kv_bytes_per_token * kv_tokens
        return (
            self.step_overhead_s
            + max(flops / self.flops_per_s, traffic / self.hbm_bytes_per_s)
            + self._allreduce_seconds(num_tokens)
        )

    def transfer_seconds(self, num_tokens: int) -> float:
        """Moving ``num_tokens`` tokens' KV over the instance's links."""
        return num_tokens * self.model.kv_bytes_per_token / self.transfer_bandwidth_bytes_per_s

    # --- The policies' linear model --------------------------------------------------------

    def operating_samples(
        self, *, max_num_seqs: int = 128, max_context_tokens: int = 131072
    ) -> tuple[list[PrefillSample], list[DecodeSample]]:
        """Roofline step times on a grid spanning serving: prefills of 64 tokens up to
        ``max_context_tokens`` with and without cached prefixes; decode batches up to
        ``max_num_seqs`` at contexts from 256 tokens per sequence to what fits in HBM."""
        prefill = []
        n = 64
        while n <= max_context_tokens:
            for cached in (0, n // 2, n, 4 * n):
                if n + cached <= max_context_tokens:
                    prefill.append(PrefillSample(n, cached, self.prefill_seconds(n, cached)))
            n *= 2
        capacity_tokens = self.kv_capacity_blocks(1)
        decode = []
        batch = 1
        while True:
            per_seq = 256
            while per_seq <= max_context_tokens and batch * per_seq <= capacity_tokens:
                context = batch * per_seq
                decode.append(
                    DecodeSample(batch, context, self.decode_step_seconds(batch, context))
                )
                per_seq *= 4
            if batch >= max_num_seqs:
                break
            batch = min(2 * batch, max_num_seqs)
        return prefill, decode

    def step_cost_model(
        self, *, max_num_seqs: int = 128, max_context_tokens: int = 131072
    ) -> StepCostModel:
        """The linear ``StepCostModel`` closest (relative error) to this roofline over the
        operating range: what the policies predict with and the simulator times steps by."""
        prefill, decode = self.operating_samples(
            max_num_seqs=max_num_seqs, max_context_tokens=max_context_tokens
        )
        return StepCostModel.fit(prefill, decode)

    def linearization_error(
        self, *, max_num_seqs: int = 128, max_context_tokens: int = 131072
    ) -> tuple[float, float]:
        """Worst relative error of ``step_cost_model()`` on the grid: (prefill, decode)."""
        linear = self.step_cost_model(
            max_num_seqs=max_num_seqs, max_context_tokens=max_context_tokens
        )
        prefill, decode = self.operating_samples(
            max_num_seqs=max_num_seqs, max_context_tokens=max_context_tokens
        )
        return (
            max(
                abs(linear.prefill_seconds(s.num_new_tokens, s.num_cached_tokens) / s.seconds - 1)
                for s in prefill
            ),
            max(
                abs(
                    linear.decode_step_seconds(s.batch_size, s.total_context_tokens) / s.seconds - 1
                )
                for s in decode
            ),
        )
