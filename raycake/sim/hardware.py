"""What a roofline needs of a GPU (vendor peak numbers) and of a model (its shape), with presets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raycake.model.config import ModelConfig

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One GPU's peak numbers from its vendor datasheet (dense, no sparsity)."""

    name: str
    bf16_flops: float  # FLOP/s, dense tensor-core BF16
    hbm_bytes_per_s: float
    hbm_bytes: float
    nvlink_bytes_per_s: float  # intra-node interconnect, per GPU (tensor-parallel all-reduce)
    rdma_bytes_per_s: float  # inter-node network per GPU (KV transfers, store reads)

    def __post_init__(self) -> None:
        for name in (
            "bf16_flops",
            "hbm_bytes_per_s",
            "hbm_bytes",
            "nvlink_bytes_per_s",
            "rdma_bytes_per_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"gpu.{name}: expected a finite number > 0, got {value!r}")


GPU_PRESETS: dict[str, GpuSpec] = {
    # NVIDIA A800 SXM4 80GB datasheet: BF16 312 TFLOPS dense, HBM2e 2,039 GB/s, NVLink 400 GB/s
    # (the export-limited A100). Network: Mooncake's A800 nodes have 4 x 200 Gbps RDMA NICs per
    # 8 GPUs (FAST'25, section 8), i.e. 100 Gbps = 12.5 GB/s per GPU.
    "a800": GpuSpec(
        name="A800",
        bf16_flops=312e12,
        hbm_bytes_per_s=2039 * GB,
        hbm_bytes=80 * GB,
        nvlink_bytes_per_s=400 * GB,
        rdma_bytes_per_s=12.5 * GB,
    ),
    # NVIDIA H100 SXM5 datasheet: BF16 989 TFLOPS dense (1,979 with sparsity), HBM3 3.35 TB/s,
    # 80 GB, NVLink 900 GB/s; DGX H100 pairs each GPU with a 400 Gbps ConnectX-7 (50 GB/s).
    "h100": GpuSpec(
        name="H100",
        bf16_flops=989e12,
        hbm_bytes_per_s=3350 * GB,
        hbm_bytes=80 * GB,
        nvlink_bytes_per_s=900 * GB,
        rdma_bytes_per_s=50 * GB,
    ),
    # NVIDIA H200 SXM datasheet: same compute as H100 (BF16 989 TFLOPS dense), HBM3e 4.8 TB/s,
    # 141 GB, NVLink 900 GB/s; 400 Gbps ConnectX-7 per GPU (50 GB/s).
    "h200": GpuSpec(
        name="H200",
        bf16_flops=989e12,
        hbm_bytes_per_s=4800 * GB,
        hbm_bytes=141 * GB,
        nvlink_bytes_per_s=900 * GB,
        rdma_bytes_per_s=50 * GB,
    ),
}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the roofline needs of a Llama-architecture model (dense or MoE)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 0  # 0: dense SwiGLU feed-forward in every layer
    experts_per_token: int = 2
    num_moe_layers: int = 0
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2  # bf16 weights and KV

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "dtype_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}: expected an integer >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads: expected a divisor of num_heads ({self.num_heads}), "
                f"got {self.num_kv_heads}"
            )
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"model.experts_per_token: expected 1..num_experts ({self.num_experts}), "
                    f"got {self.experts_per_token}"
                )
            if not 1 <= self.num_moe_layers <= self.num_layers:
                raise ValueError(
                    f"model.num_moe_layers: expected 1..num_layers ({self.num_layers}) for an "
                    f"MoE model, got {self.num_moe_layers}"
                )

    @classmethod
    def from_model_config(cls, config: ModelConfig, name: str = "custom") -> ModelShape:
        """The shape of a raycake ``ModelConfig`` (the engine's), MoE layers included."""
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_experts=config.num_experts,
            experts_per_token=config.num_experts_per_tok if config.num_experts else 2,
            num_moe_layers=config.num_moe_layers,
            tie_word_embeddings=config.tie_word_embeddings,
        )

    @property
    def attention_params_per_layer(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    @property
    def mlp_params(self) -> int:
        """One SwiGLU feed-forward (or one expert): gate, up and down projections."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - (self.num_moe_layers if self.num_experts else 0)

    @property
    def num_params(self) -> int:
        """All weights, embeddings included (what must sit in HBM)."""
        moe_layers = self.num_layers - self.num_dense_layers
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return (
            self.num_layers * self.attention_params_per_layer
            + self.num_dense_layers * self.mlp_params
            + moe_layers
            * (self.num_experts * self.mlp_params + self.hidden_size * self.num_experts)
            + embeddings
        )

    @property
    def active_layer_params(self) -> int:
        """Decoder-layer weights one token multiplies (its top-k experts only)."""
        moe_layers = self.num_layers - self.num_dense_layers
        return (
            self.num_layers * self.attention_params_per_layer
            + self.num_dense_layers * self.mlp_params
            + moe_layers * (self.experts_per_token * self.mlp_params)
        )

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> int:
        """Q.K and P.V of one query-key pair over all layers and heads: 2 x 2 x heads x head_dim."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


MODEL_PRESETS: dict[str, ModelShape] = {
    # Meta Llama 3 / 3.1 config.json (8B and 70B): GQA with 8 KV heads, 128k vocabulary.
    "llama3-8b": ModelShape(
        name="llama3-8b",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "llama3-70b": ModelShape(
        name="llama3-70b",
        num_layers=80,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        vocab_size=128256,
    ),
    # Mixtral 8x7B config.json: 8 experts, top-2, in every layer.
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=32000,
        num_experts=8,
        experts_per_token=2,
        num_moe_layers=32,
    ),
}


def _preset(presets: dict, kind: str, name: str):
    try:
        return presets[name.lower()]
    except KeyError:
        raise ValueError(f"{kind}: expected one of {sorted(presets)}, got {name!r}") from None


def gpu_preset(name: str) -> GpuSpec:
    return _preset(GPU_PRESETS, "gpu", name)


def model_preset(name: str) -> ModelShape:
    return _preset(MODEL_PRESETS, "model", name)
