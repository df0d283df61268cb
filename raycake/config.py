"""One tree of frozen config dataclasses, validated on construction and passed down explicitly.

Each component receives only its own config: the scheduler a ``SchedulerConfig`` and a
``CacheConfig``, the model a ``ModelConfig``. ``EngineConfig`` composes them at the top.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# SwitchLlamaForCausalLM is raycake's own: Llama with a Switch (top-1) MoE feed-forward in
# every ``decoder_sparse_step``-th layer, the embedded MoE model's architecture.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM", "SwitchLlamaForCausalLM")
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "SwitchLlamaForCausalLM": "switch_llama",
}
# The routing a checkpoint was trained with: Mixtral's renormalized top-k, or Switch top-1.
CHECKPOINT_ROUTERS = ("topk", "switch")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# Weight quantization at load time: None keeps the checkpoint's weights in ``dtype``.
QUANTIZATIONS = ("int8",)


def _require(condition: bool, field_name: str, expected: str, got: Any) -> None:
    if not condition:
        raise ValueError(f"{field_name}: expected {expected}, got {got!r}")


def _positive_int(field_name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field_name,
        "a positive integer",
        value,
    )


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a ``.json`` or ``.yaml`` config file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _from_mapping(cls: type, data: Any, where: str, nested: dict[str, type] | None = None) -> Any:
    """A config dataclass from a dict whose ``nested`` sections are dicts too; a section type
    with its own ``from_dict`` builds itself. Unknown keys are an error that names them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected {sorted(known)}")
    kwargs = dict(data)
    for key, section in (nested or {}).items():
        if key in kwargs:
            build = getattr(section, "from_dict", None)
            value = kwargs[key]
            kwargs[key] = build(value) if build else _from_mapping(section, value, f"{where} {key}")
    return cls(**kwargs)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, "rope_scaling.factor", ">= 1.0", self.factor)
        _require(
            self.high_freq_factor > self.low_freq_factor,
            "rope_scaling.high_freq_factor",
            f"> low_freq_factor ({self.low_freq_factor})",
            self.high_freq_factor,
        )
        _positive_int(
            "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings
        )


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
            _positive_int(name, getattr(self, name))
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
            self.num_key_value_heads,
        )
        _require(
            self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)", self.head_dim
        )
        _require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            "architectures",
            f"one of {SUPPORTED_ARCHITECTURES}",
            self.architecture,
        )
        if self.num_experts:
            _require(
                0 < self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok",
                f"1..num_local_experts ({self.num_experts})",
                self.num_experts_per_tok,
            )
            _positive_int("decoder_sparse_step", self.decoder_sparse_step)
            _require(
                self.router_type in CHECKPOINT_ROUTERS,
                "router_type",
                f"one of {list(CHECKPOINT_ROUTERS)}",
                self.router_type,
            )
            _require(
                self.router_type != "switch" or self.num_experts_per_tok == 1,
                "num_experts_per_tok",
                "1 with router_type 'switch' (Switch routes each token to one expert)",
                self.num_experts_per_tok,
            )

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
        _require(
            isinstance(architectures, list) and len(architectures) == 1,
            "architectures",
            "a list with one architecture name",
            architectures,
        )
        _require(
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
        if hf.get("sliding_window") is not None:
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


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: how many blocks of how many tokens, and prefix caching."""

    block_size: int = 16
    # None: size the pool from kv_cache_memory_bytes.
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    eviction_policy: str = "lru"

    def __post_init__(self) -> None:
        _positive_int("cache.block_size", self.block_size)
        if self.num_blocks is not None:
            _positive_int("cache.num_blocks", self.num_blocks)
        _positive_int("cache.kv_cache_memory_bytes", self.kv_cache_memory_bytes)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # A single prefill chunk never exceeds this many tokens, so decodes keep flowing.
    max_prefill_chunk: int = 512

    def __post_init__(self) -> None:
        _positive_int("scheduler.max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("scheduler.max_num_seqs", self.max_num_seqs)
        _positive_int("scheduler.max_prefill_chunk", self.max_prefill_chunk)
        if self.max_model_len is not None:
            _positive_int("scheduler.max_model_len", self.max_model_len)
        _require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "scheduler.max_num_batched_tokens",
            f">= max_num_seqs ({self.max_num_seqs}) so every running sequence can decode",
            self.max_num_batched_tokens,
        )


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
            _require(
                self.router in MOE_ROUTERS, "moe.router", f"one of {list(MOE_ROUTERS)}", self.router
            )
        if self.capacity_factor is not None:
            _require(
                self.capacity_factor > 0, "moe.capacity_factor", "> 0 or None", self.capacity_factor
            )
        _require(
            isinstance(self.num_expert_shards, int) and self.num_expert_shards >= 0,
            "moe.num_expert_shards",
            "an integer >= 0",
            self.num_expert_shards,
        )
        _require(
            self.expert_transport in EXPERT_TRANSPORTS,
            "moe.expert_transport",
            f"one of {list(EXPERT_TRANSPORTS)}",
            self.expert_transport,
        )


SPECULATIVE_METHODS = ("eagle",)
SPECULATION_POLICIES = ("off", "fixed", "adaptive")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: an EAGLE draft head proposes a token tree the target verifies."""

    # "eagle": an EAGLE-1 head (raycake.model.eagle); None: speculation off.
    method: str | None = "eagle"
    # The head's folder (config.json + model.safetensors); "default": the embedded model's head.
    draft_model: str = ""
    # Draft tree node budget per request per step (the most draft tokens verified at once).
    num_draft_tokens: int = 8
    tree_top_k: int = 4  # children per expanded node, and nodes expanded per depth (EAGLE-2)
    max_depth: int = 4  # the deepest draft token (tokens accepted per step <= max_depth + 1)
    # Per-step draft budget: "fixed" (num_draft_tokens), "adaptive" (by load), "off".
    policy: str = "fixed"

    def __post_init__(self) -> None:
        if self.method is not None:
            _require(
                self.method in SPECULATIVE_METHODS,
                "speculative.method",
                f"one of {list(SPECULATIVE_METHODS)} or null",
                self.method,
            )
            _require(
                isinstance(self.draft_model, str) and self.draft_model != "",
                "speculative.draft_model",
                "the EAGLE head's folder",
                self.draft_model,
            )
        _positive_int("speculative.num_draft_tokens", self.num_draft_tokens)
        _positive_int("speculative.tree_top_k", self.tree_top_k)
        _positive_int("speculative.max_depth", self.max_depth)
        _require(
            self.policy in SPECULATION_POLICIES,
            "speculative.policy",
            f"one of {list(SPECULATION_POLICIES)}",
            self.policy,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything one serving instance needs; ``model`` is a checkpoint folder or ``"default"``."""

    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # "int8": LLM.int8() linear layers (int8 weights, outlier features in ``dtype``).
    quantization: str | None = None
    # |x| at or above which an activation feature column is an outlier kept out of int8.
    int8_threshold: float = 6.0
    # None: plain decoding.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.model, str) and self.model != "",
            "model",
            "a path or 'default'",
            self.model,
        )
        _require(self.dtype in SUPPORTED_DTYPES, "dtype", f"one of {SUPPORTED_DTYPES}", self.dtype)
        if self.quantization is not None:
            _require(
                self.quantization in QUANTIZATIONS,
                "quantization",
                f"one of {list(QUANTIZATIONS)} or null",
                self.quantization,
            )
        _require(
            isinstance(self.int8_threshold, (int, float)) and self.int8_threshold >= 0,
            "int8_threshold",
            "a number >= 0 (0: no outlier decomposition)",
            self.int8_threshold,
        )
        _require(isinstance(self.seed, int), "seed", "an integer", self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Build from a plain dict (parsed JSON or YAML); unknown keys are an error."""
        nested = {
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "moe": MoEConfig,
            "speculative": SpeculativeConfig,
        }
        if isinstance(data, dict) and data.get("speculative") is None:
            nested.pop("speculative")
        return _from_mapping(cls, data, "engine config", nested)

    @classmethod
    def from_file(cls, path: str | Path) -> EngineConfig:
        """Load from a ``.json`` or ``.yaml`` file."""
        return cls.from_dict(read_mapping(path))


@dataclass(frozen=True)
class TrainConfig:
    """``raycake train``: the embedded default model, trained from scratch on the stdlib corpus."""

    out_dir: str
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 3000
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_batches: int = 16
    held_out_percent: int = 2
    # None: the whole stdlib. A small number makes a quick smoke run of the pipeline.
    max_corpus_files: int | None = None
    save_dtype: str = "float32"
    # A folder whose tokenizer.json to reuse instead of training BPE (so that two models
    # are compared on the same tokens); None: train one.
    tokenizer_dir: str | None = None
    # > 0: a Switch-MoE model (SwitchLlamaForCausalLM): top-1 routing over num_experts experts
    # in every decoder_sparse_step-th layer, trained with the paper's capacity factor and
    # load-balancing loss (alpha = 1e-2).
    num_experts: int = 0
    decoder_sparse_step: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "seq_len",
            "batch_size",
            "steps",
            "eval_every",
            "eval_batches",
        ):
            _positive_int(f"train.{name}", getattr(self, name))
        _require(
            self.vocab_size >= 259,
            "train.vocab_size",
            ">= 259 (256 bytes + specials)",
            self.vocab_size,
        )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "train.hidden_size",
            f"a multiple of num_attention_heads ({self.num_attention_heads})",
            self.hidden_size,
        )
        _require(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        if self.max_corpus_files is not None:
            _positive_int("train.max_corpus_files", self.max_corpus_files)
        _require(
            self.save_dtype in SUPPORTED_DTYPES,
            "train.save_dtype",
            str(SUPPORTED_DTYPES),
            self.save_dtype,
        )
        _require(
            isinstance(self.num_experts, int) and self.num_experts >= 0,
            "train.num_experts",
            "an integer >= 0 (0: dense)",
            self.num_experts,
        )
        if self.num_experts:
            _require(
                self.num_experts >= 2,
                "train.num_experts",
                ">= 2 (one expert is a dense layer)",
                self.num_experts,
            )
            _positive_int("train.decoder_sparse_step", self.decoder_sparse_step)
            _require(
                self.capacity_factor > 0,
                "train.capacity_factor",
                "> 0",
                self.capacity_factor,
            )
            _require(self.aux_loss_coef >= 0, "train.aux_loss_coef", ">= 0", self.aux_loss_coef)


@dataclass(frozen=True)
class EagleTrainConfig:
    """``raycake train-eagle``: an EAGLE-1 draft head for a frozen target, on a text corpus."""

    out_dir: str
    # An embedded model name ("default") or a checkpoint folder with tokenizer.json.
    target: str = "default"
    # A folder of .py files split like the stdlib; None: the stdlib (the embedded model's corpus).
    corpus_root: str | None = None
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 2000
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    # The EAGLE paper's loss: feature_loss_weight x smooth-L1 + token_loss_weight x CE.
    feature_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    # What the CE is against: "target", the target's own next-token distribution (the paper's
    # CrossEntropy(p_{i+2}, p^_{i+2}) with p_{i+2} = Softmax(LM_Head(f_{i+1}))); "text", the
    # corpus token x[t+2].
    token_target: str = "target"
    # Half-width of the uniform noise added to the input features (absolute; 0: none).
    feature_noise: float = 0.1
    # > 0: compute the target's features for this many training windows once and train on them
    # (epochs); 0: run the target on every batch (fresh windows each step).
    cache_windows: int = 0
    eval_every: int = 200
    eval_windows: int = 64
    held_out_percent: int = 2
    max_corpus_files: int | None = None
    save_dtype: str = "float32"
    # Drafts come from this many most frequent training tokens (EAGLE-3's reduced draft
    # vocabulary); None: the whole vocabulary.
    draft_vocab_size: int | None = 1024

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_windows"):
            _positive_int(f"train_eagle.{name}", getattr(self, name))
        _require(self.seq_len >= 3, "train_eagle.seq_len", ">= 3", self.seq_len)
        _require(self.learning_rate > 0, "train_eagle.learning_rate", "> 0", self.learning_rate)
        for name in (
            "min_learning_rate",
            "weight_decay",
            "feature_loss_weight",
            "token_loss_weight",
            "feature_noise",
        ):
            _require(getattr(self, name) >= 0, f"train_eagle.{name}", ">= 0", getattr(self, name))
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "train_eagle.warmup_steps",
            "an integer >= 0",
            self.warmup_steps,
        )
        _require(
            self.token_target in ("target", "text"),
            "train_eagle.token_target",
            "'target' or 'text'",
            self.token_target,
        )
        _require(
            isinstance(self.cache_windows, int) and self.cache_windows >= 0,
            "train_eagle.cache_windows",
            "an integer >= 0 (0: no cache)",
            self.cache_windows,
        )
        if self.max_corpus_files is not None:
            _positive_int("train_eagle.max_corpus_files", self.max_corpus_files)
        if self.draft_vocab_size is not None:
            _positive_int("train_eagle.draft_vocab_size", self.draft_vocab_size)
        _require(
            self.save_dtype in SUPPORTED_DTYPES,
            "train_eagle.save_dtype",
            str(SUPPORTED_DTYPES),
            self.save_dtype,
        )


SCHEDULING_POLICY_NAMES = (
    "cache_aware",
    "dynamo_kv",
    "least_loaded",
    "random",
    "round_robin",
    "sglang_cache_aware",
)
TRANSFER_BACKENDS = ("mooncake", "object_store", "ray_direct")
TELEMETRY_EXPORTERS = ("none", "console", "memory", "otlp")


@dataclass(frozen=True)
class SchedulingConfig:
    """The conductor's policy by name and its options; the cache-aware ones apply only to it."""

    policy: str = "cache_aware"
    # Cluster-wide SLOs the conductor stamps on requests that set none; None: no SLO.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # Fetch a longer store prefix only when it is over this many times the local one.
    balance_threshold: float = 1.0
    enable_early_rejection: bool = True
    predictive_rejection: bool = False
    use_store: bool = True
    seed: int = 0  # for the random policy

    def __post_init__(self) -> None:
        _require(
            self.policy in SCHEDULING_POLICY_NAMES,
            "scheduling.policy",
            f"one of {list(SCHEDULING_POLICY_NAMES)}",
            self.policy,
        )
        for name in ("ttft_slo_s", "tbt_slo_s"):
            value = getattr(self, name)
            if value is not None:
                _require(
                    isinstance(value, (int, float)) and 0 < value < float("inf"),
                    f"scheduling.{name}",
                    "a finite number > 0 (seconds)",
                    value,
                )
        _require(
            isinstance(self.balance_threshold, (int, float))
            and 1.0 <= self.balance_threshold < float("inf"),
            "scheduling.balance_threshold",
            "a finite number >= 1.0",
            self.balance_threshold,
        )
        for name in ("enable_early_rejection", "predictive_rejection", "use_store"):
            _require(
                isinstance(getattr(self, name), bool),
                f"scheduling.{name}",
                "a bool",
                getattr(self, name),
            )
        _require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "scheduling.seed",
            "an integer",
            self.seed,
        )


@dataclass(frozen=True)
class TelemetryConfig:
    """Where request spans go: "none", "console", "memory" (tests), or "otlp"."""

    exporter: str = "none"
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces
    service_name: str = "raycake"

    def __post_init__(self) -> None:
        _require(
            self.exporter in TELEMETRY_EXPORTERS,
            "telemetry.exporter",
            f"one of {list(TELEMETRY_EXPORTERS)}",
            self.exporter,
        )


@dataclass(frozen=True)
class ClusterConfig:
    """A disaggregated deployment: prefill and decode instances, KV store shards, a conductor."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    num_prefill: int = 1
    num_decode: int = 1
    num_store_shards: int = 2
    store_capacity_bytes: int = 256 * 1024 * 1024  # per shard
    # Copy a block to the next shard once it has been read this often (None: no replicas).
    store_replicate_after_reads: int | None = None
    transfer_backend: str = "object_store"
    # Store -> instance bandwidth the conductor plans with (bytes/s).
    transfer_bandwidth_bytes_per_s: float = 2e9
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # Placement: GPUs per instance on a GPU cluster; on CPU a custom resource the autoscaler
    # can provide (e.g. {"raycake_instance": 1}).
    instance_num_gpus: float = 0.0
    instance_num_cpus: float = 1.0
    instance_resources: dict[str, float] = field(default_factory=dict)
    # None: join the running Ray cluster if there is one, else start a local one.
    ray_address: str | None = None
    namespace: str = "raycake"
    actor_max_restarts: int = 2
    # A request whose decode or prefill instance dies is retried this many times.
    request_max_retries: int = 2

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode"):
            _positive_int(f"cluster.{name}", getattr(self, name))
        _require(
            isinstance(self.num_store_shards, int) and self.num_store_shards >= 0,
            "cluster.num_store_shards",
            "an integer >= 0 (0: no KV store)",
            self.num_store_shards,
        )
        _positive_int("cluster.store_capacity_bytes", self.store_capacity_bytes)
        if self.store_replicate_after_reads is not None:
            _positive_int("cluster.store_replicate_after_reads", self.store_replicate_after_reads)
        _require(
            self.transfer_backend in TRANSFER_BACKENDS,
            "cluster.transfer_backend",
            f"one of {list(TRANSFER_BACKENDS)}",
            self.transfer_backend,
        )
        _require(
            self.transfer_bandwidth_bytes_per_s > 0,
            "cluster.transfer_bandwidth_bytes_per_s",
            "> 0",
            self.transfer_bandwidth_bytes_per_s,
        )
        for name in ("instance_num_gpus", "instance_num_cpus"):
            _require(getattr(self, name) >= 0, f"cluster.{name}", ">= 0", getattr(self, name))
        for name in ("actor_max_restarts", "request_max_retries"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 0, f"cluster.{name}", "an integer >= 0", value
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """Build from parsed YAML/JSON; nested sections are dicts; unknown keys are an error."""
        nested = {
            "engine": EngineConfig,
            "scheduling": SchedulingConfig,
            "telemetry": TelemetryConfig,
        }
        return _from_mapping(cls, data, "cluster config", nested)

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterConfig:
        """Load from a ``.json`` or ``.yaml`` file."""
        return cls.from_dict(read_mapping(path))
