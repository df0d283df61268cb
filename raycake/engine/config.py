"""One serving instance's configuration: the paged KV cache, the batch scheduler, and
``EngineConfig``, which composes them with the model's MoE and speculation settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycake.engine.spec.config import SpeculativeConfig
from raycake.model.config import SUPPORTED_DTYPES, MoEConfig
from raycake.validation import check_positive_int, from_mapping, read_mapping, require

# Weight quantization at load time: None keeps the checkpoint's weights in ``dtype``.
QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: how many blocks of how many tokens, and prefix caching."""

    block_size: int = 16
    # None: size the pool from kv_cache_memory_bytes.
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    eviction_policy: str = "lru"
    # Titans models: the byte budget of per-sequence memory states (running requests' and
    # prefix snapshots'); other models ignore it.
    memory_state_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        check_positive_int("cache.block_size", self.block_size)
        check_positive_int("cache.memory_state_bytes", self.memory_state_bytes)
        if self.num_blocks is not None:
            check_positive_int("cache.num_blocks", self.num_blocks)
        check_positive_int("cache.kv_cache_memory_bytes", self.kv_cache_memory_bytes)


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
        check_positive_int("scheduler.max_num_batched_tokens", self.max_num_batched_tokens)
        check_positive_int("scheduler.max_num_seqs", self.max_num_seqs)
        check_positive_int("scheduler.max_prefill_chunk", self.max_prefill_chunk)
        if self.max_model_len is not None:
            check_positive_int("scheduler.max_model_len", self.max_model_len)
        require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "scheduler.max_num_batched_tokens",
            f">= max_num_seqs ({self.max_num_seqs}) so every running sequence can decode",
            self.max_num_batched_tokens,
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
    # On CPU: hold fp32/bf16 linear weights prepacked for oneDNN (faster matmuls at serving
    # batch sizes, for one more copy of those weights in memory), and send calls of 1-4 rows
    # to small layers to raycake's own kernel (``model/cpu_prepack.py``). Ignored elsewhere.
    prepack_weights: bool = True
    # Run steps of decodes through a graph compiled by ``torch.compile`` (small ops fused,
    # attention reading the paged cache in place). The first decode step compiles (tens of
    # seconds on a small CPU); dense Llama models only, without speculative decoding.
    compile_decode: bool = False
    # On CPU: keep freed memory in glibc's heap (``mallopt``; see ``engine/cpu_malloc.py``), so
    # each step's large temporaries do not fault in fresh pages. Process-wide; it keeps the
    # process's peak heap. Ignored on other devices and C libraries.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        require(
            isinstance(self.model, str) and self.model != "",
            "model",
            "a path or 'default'",
            self.model,
        )
        require(self.dtype in SUPPORTED_DTYPES, "dtype", f"one of {SUPPORTED_DTYPES}", self.dtype)
        if self.quantization is not None:
            require(
                self.quantization in QUANTIZATIONS,
                "quantization",
                f"one of {list(QUANTIZATIONS)} or null",
                self.quantization,
            )
        require(
            isinstance(self.int8_threshold, (int, float)) and self.int8_threshold >= 0,
            "int8_threshold",
            "a number >= 0 (0: no outlier decomposition)",
            self.int8_threshold,
        )
        require(isinstance(self.seed, int), "seed", "an integer", self.seed)
        require(
            isinstance(self.prepack_weights, bool),
            "prepack_weights",
            "true or false",
            self.prepack_weights,
        )
        require(
            isinstance(self.keep_freed_memory, bool),
            "keep_freed_memory",
            "true or false",
            self.keep_freed_memory,
        )
        require(
            isinstance(self.compile_decode, bool),
            "compile_decode",
            "true or false",
            self.compile_decode,
        )
        require(
            not (
                self.compile_decode
                and self.speculative is not None
                and self.speculative.method is not None
            ),
            "compile_decode",
            "false when speculative decoding is on (verify steps are not compiled)",
            self.compile_decode,
        )

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
        return from_mapping(cls, data, "engine config", nested)

    @classmethod
    def from_file(cls, path: str | Path) -> EngineConfig:
        """Load from a ``.json`` or ``.yaml`` file."""
        return cls.from_dict(read_mapping(path))
