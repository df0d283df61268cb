"""The model's configuration: its shape as read from a Hugging Face ``config.json`` (and
written back), and how its MoE layers route and where their experts run."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from raycake.validation import check_positive_int, is_int, is_number, require

# SwitchLlamaForCausalLM is raycake's own: Llama with a Switch (top-1) MoE feed-forward in
# every ``decoder_sparse_step``-th layer, the embedded MoE model's architecture.
# TitansMAGForCausalLM is raycake's own too: Titans' memory-as-gate variant (``TitansConfig``).
TITANS_ARCHITECTURE = "TitansMAGForCausalLM"
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "SwitchLlamaForCausalLM",
    TITANS_ARCHITECTURE,
)
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "SwitchLlamaForCausalLM": "switch_llama",
    TITANS_ARCHITECTURE: "titans_mag",
}
# The routing a checkpoint was trained with: Mixtral's renormalized top-k, or Switch top-1.
CHECKPOINT_ROUTERS = ("topk", "switch")
# The dtypes weights are served and saved in.
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        require(self.factor >= 1.0, "rope_scaling.factor", ">= 1.0", self.factor)
        require(
            self.high_freq_factor > self.low_freq_factor,
            "rope_scaling.high_freq_factor",
            f"> low_freq_factor ({self.low_freq_factor})",
            self.high_freq_factor,
        )
        check_positive_int(
            "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings
        )


@dataclass(frozen=True)
class NeuralMemoryConfig:
    """Titans' neural long-term memory (one per memory layer): a per-head MLP memory of
    ``depth`` layers, written chunk by chunk with momentum and forgetting."""

    hidden_size: int  # E: the input and output width
    num_heads: int
    head_dim: int  # num_heads * head_dim need not equal E
    depth: int = 2  # L_M >= 2: the paper's deep memory
    expansion: int = 2  # the memory MLP's hidden width = expansion * head_dim
    chunk_size: int = 16  # tokens per parallel update (the paper's section 3.2)
    # theta's upper bound, titans-pytorch's default. With l2-normalised keys and the loss's mean
    # over head_dim, one token's step at theta = 1 shrinks its own error by only ~2% at head_dim
    # 64 (measured), so a smaller cap leaves an untrained memory all but unwritable.
    max_lr: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "expansion", "chunk_size"):
            check_positive_int(f"titans.{name}", getattr(self, name))
        require(
            is_int(self.depth) and self.depth >= 2,
            "titans.depth",
            "an integer >= 2 (a deep memory)",
            self.depth,
        )
        require(
            is_number(self.max_lr) and 0 < self.max_lr <= 10,
            "titans.max_lr",
            "a number in (0, 10]",
            self.max_lr,
        )

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of each memory MLP layer, per head."""
        hidden = self.expansion * self.head_dim
        dims = [self.head_dim] + [hidden] * (self.depth - 1) + [self.head_dim]
        return list(itertools.pairwise(dims))

    def state_numel(self) -> int:
        """Floats in one sequence's memory state: weights and momentum, every head."""
        return 2 * self.num_heads * sum(i * o for i, o in self.layer_shapes())


@dataclass(frozen=True)
class TitansConfig:
    """Titans MAG (memory as a gate): each decoder layer attends over a sliding window plus
    learned persistent-memory tokens, and the layers in ``memory_layers`` gate that attention
    with a neural long-term memory read from, and written by, the same input."""

    sliding_window: int  # tokens each query attends (itself included)
    memory: NeuralMemoryConfig
    num_persistent_tokens: int = 4
    # Decoder layers with a memory branch; () means every layer.
    memory_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_positive_int("titans.sliding_window", self.sliding_window)
        require(
            is_int(self.num_persistent_tokens) and self.num_persistent_tokens >= 0,
            "titans.num_persistent_tokens",
            "an integer >= 0",
            self.num_persistent_tokens,
        )
        require(
            all(is_int(i) and i >= 0 for i in self.memory_layers),
            "titans.memory_layers",
            "layer indices >= 0",
            self.memory_layers,
        )

    def has_memory(self, index: int) -> bool:
        return not self.memory_layers or index in self.memory_layers

    @classmethod
    def from_hf(cls, hf: dict[str, Any], hidden_size: int) -> TitansConfig:
        """From config.json's ``sliding_window`` and ``titans`` entries."""
        titans = dict(hf.get("titans") or {})
        require("sliding_window" in hf, "sliding_window", "an integer for TitansMAG", None)
        memory_keys = ("num_heads", "head_dim", "depth", "expansion", "chunk_size", "max_lr")
        memory = {k: titans.pop(k) for k in memory_keys if k in titans}
        layers = titans.pop("memory_layers", [])
        persistent = titans.pop("num_persistent_tokens", 4)
        if titans:
            raise ValueError(f"config.json titans: unknown field(s) {sorted(titans)}")
        return cls(
            sliding_window=hf["sliding_window"],
            memory=NeuralMemoryConfig(hidden_size=hidden_size, **memory),
            num_persistent_tokens=persistent,
            memory_layers=tuple(layers),
        )

    def to_hf(self) -> dict[str, Any]:
        memory = asdict(self.memory)
        memory.pop("hidden_size")
        return {
            "sliding_window": self.sliding_window,
            "titans": {
                **memory,
                "num_persistent_tokens": self.num_persistent_tokens,
                "memory_layers": list(self.memory_layers),
            },
        }


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-architecture model, read from a Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    # Mixture of experts in the feed-forward (Mixtral, Switch); 0: dense SwiGLU (Llama).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # Layer i is an MoE layer when (i + 1) % decoder_sparse_step == 0 (Qwen2-MoE's name):
    # 1 = every layer (Mixtral), 2 = every other layer (Switch Transformer).
    decoder_sparse_step: int = 1
    router_type: str = "topk"
    # Titans MAG only (architecture TitansMAGForCausalLM): window, memory, persistent tokens.
    titans: TitansConfig | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            check_positive_int(name, getattr(self, name))
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
            self.num_key_value_heads,
        )
        require(
            self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)", self.head_dim
        )
        require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            "architectures",
            f"one of {SUPPORTED_ARCHITECTURES}",
            self.architecture,
        )
        if self.num_experts:
            require(
                0 < self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok",
                f"1..num_local_experts ({self.num_experts})",
                self.num_experts_per_tok,
            )
            check_positive_int("decoder_sparse_step", self.decoder_sparse_step)
            require(
                self.router_type in CHECKPOINT_ROUTERS,
                "router_type",
                f"one of {list(CHECKPOINT_ROUTERS)}",
                self.router_type,
            )
            require(
                self.router_type != "switch" or self.num_experts_per_tok == 1,
                "num_experts_per_tok",
                "1 with router_type 'switch' (Switch routes each token to one expert)",
                self.num_experts_per_tok,
            )

        require(
            (self.titans is not None) == (self.architecture == TITANS_ARCHITECTURE),
            "titans",
            f"a TitansConfig exactly when the architecture is {TITANS_ARCHITECTURE}",
            self.titans,
        )
        if self.titans is not None:
            require(
                all(i < self.num_hidden_layers for i in self.titans.memory_layers),
                "titans.memory_layers",
                f"indices < num_hidden_layers ({self.num_hidden_layers})",
                self.titans.memory_layers,
            )
            require(
                self.titans.memory.hidden_size == self.hidden_size,
                "titans.memory.hidden_size",
                f"the model's hidden_size ({self.hidden_size})",
                self.titans.memory.hidden_size,
            )

    @property
    def is_titans(self) -> bool:
        return self.titans is not None

    @property
    def memory_layer_indices(self) -> list[int]:
        """Decoder layers with a Titans memory branch (none for other architectures)."""
        if self.titans is None:
            return []
        return [i for i in range(self.num_hidden_layers) if self.titans.has_memory(i)]

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` has a routed MoE feed-forward."""
        return bool(self.num_experts) and (index + 1) % self.decoder_sparse_step == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        architectures = hf.get("architectures") or []
        require(
            isinstance(architectures, list) and len(architectures) == 1,
            "architectures",
            "a list with one architecture name",
            architectures,
        )
        require(
            architectures[0] in SUPPORTED_ARCHITECTURES,
            "architectures",
            f"one of {SUPPORTED_ARCHITECTURES}",
            architectures[0],
        )
        missing = [
            key
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if key not in hf
        ]
        if missing:
            raise ValueError(f"config.json: missing required field(s) {missing}")
        # transformers 5 nests rope settings in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope
        rope_type = (
            scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        )
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise ValueError(
                f"config.json rope_scaling.rope_type: expected 'default' or 'llama3', got {rope_type!r}"
            )
        titans = None
        if architectures[0] == TITANS_ARCHITECTURE:
            titans = TitansConfig.from_hf(hf, hf["hidden_size"])
        elif hf.get("sliding_window") is not None:
            raise ValueError(
                f"config.json sliding_window: expected null (sliding-window attention is not "
                f"supported), got {hf['sliding_window']!r}"
            )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=architectures[0],
            num_experts=int(hf.get("num_local_experts") or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok") or 2),
            decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
            router_type=str(hf.get("router_type") or "topk"),
            titans=titans,
        )

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """The ``config.json`` that transformers loads as ``LlamaForCausalLM``."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        extra: dict[str, Any] = {}
        if self.num_experts:
            extra = {
                "num_local_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "sliding_window": None,
            }
            if self.architecture == "SwitchLlamaForCausalLM":
                extra["decoder_sparse_step"] = self.decoder_sparse_step
                extra["router_type"] = self.router_type
        if self.titans is not None:
            extra = self.titans.to_hf()
        return {
            "architectures": [self.architecture],
            "model_type": MODEL_TYPES[self.architecture],
            **extra,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": dtype,
        }


MOE_ROUTERS = ("hash", "switch", "topk")
EXPERT_TRANSPORTS = ("auto", "compiled", "calls")


@dataclass(frozen=True)
class MoEConfig:
    """How MoE layers route and where their experts run (dense models ignore it)."""

    # None: the checkpoint's own routing (Mixtral: top-k over num_experts_per_tok, renormalized).
    router: str | None = None
    # Expert capacity factor for "switch" (None: dropless; tokens past capacity are dropped).
    capacity_factor: float | None = None
    # 0: experts in-process; N: ExpertShard Ray actors, each holding a range of every layer's.
    num_expert_shards: int = 0
    # How a step reaches the shards: "compiled" (a Ray Compiled Graph; its channels busy-wait,
    # a core per shard), "calls" (ordinary actor calls), "auto" (compiled when cores allow).
    expert_transport: str = "auto"

    def __post_init__(self) -> None:
        if self.router is not None:
            require(
                self.router in MOE_ROUTERS, "moe.router", f"one of {list(MOE_ROUTERS)}", self.router
            )
        if self.capacity_factor is not None:
            require(
                self.capacity_factor > 0, "moe.capacity_factor", "> 0 or None", self.capacity_factor
            )
        require(
            isinstance(self.num_expert_shards, int) and self.num_expert_shards >= 0,
            "moe.num_expert_shards",
            "an integer >= 0",
            self.num_expert_shards,
        )
        require(
            self.expert_transport in EXPERT_TRANSPORTS,
            "moe.expert_transport",
            f"one of {list(EXPERT_TRANSPORTS)}",
            self.expert_transport,
        )
