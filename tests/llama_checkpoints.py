"""Tiny random checkpoints for tests, built and saved the way users' checkpoints are: Llama and
Mixtral through transformers' ``save_pretrained``, and raycake's own architectures (Switch-Llama)
through ``raycake.model.loader.save_checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raycake.model.config import ModelConfig
from raycake.training.bpe import save_tokenizer, train_bpe

VOCAB_SIZE = 320
_TOKENIZER_TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
]


@dataclass(frozen=True)
class TinyLlama:
    """One configuration that matters for parity."""

    name: str
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int = 64
    head_dim: int | None = None
    llama3_rope: bool = False
    tie_word_embeddings: bool = False

    def hf_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=3 * self.hidden_size // 2,
            num_hidden_layers=2,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=512,
            rope_theta=10000.0,
            tie_word_embeddings=self.tie_word_embeddings,
            # Larger than the default 0.02 so greedy choices are not near-ties.
            initializer_range=0.2,
            bos_token_id=0,
            eos_token_id=1,
        )
        if self.head_dim is not None:
            kwargs["head_dim"] = self.head_dim
        if self.llama3_rope:
            kwargs["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        return kwargs


CONFIGS = [
    TinyLlama("mha-gqa1", num_attention_heads=4, num_key_value_heads=4),
    TinyLlama("gqa2-llama3-rope", num_attention_heads=4, num_key_value_heads=2, llama3_rope=True),
    TinyLlama(
        "gqa4-tied-headdim",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=12,
        tie_word_embeddings=True,
    ),
]


def build_checkpoint(spec: TinyLlama, out_dir: Path, seed: int = 0):
    """Save a random ``LlamaForCausalLM`` with a byte-level BPE tokenizer; return the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**spec.hf_kwargs())).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(train_bpe(_TOKENIZER_TEXT, VOCAB_SIZE), out_dir)
    return model


def build_mixtral_checkpoint(out_dir: Path, num_experts: int, vocab_size: int = 300):
    """Save a random ``MixtralForCausalLM`` (top-2 of ``num_experts``); return the HF model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(num_experts)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = MixtralForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    save_tokenizer(train_bpe(["def f(x):\n    return x + 1\n"], vocab_size), out_dir)
    return model


# The Switch-Llama MoE of the embedded ``default-moe``: top-1 of 4 experts in every other layer.
SWITCH_MOE: dict[str, Any] = dict(
    architecture="SwitchLlamaForCausalLM",
    num_experts=4,
    num_experts_per_tok=1,
    decoder_sparse_step=2,
    router_type="switch",
)


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A 4-layer, 32-wide raycake ``ModelConfig`` (GQA 4/2, head_dim 8); ``overrides`` win."""
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_ids=(1,),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_titans_config(**titans_overrides: Any) -> ModelConfig:
    """A tiny Titans MAG model: a window of 12 tokens, memory chunks of 8 (two blocks of 4)."""
    from raycake.model.config import TITANS_ARCHITECTURE, NeuralMemoryConfig, TitansConfig

    fields: dict[str, Any] = dict(
        sliding_window=12,
        memory=NeuralMemoryConfig(hidden_size=32, num_heads=2, head_dim=8, chunk_size=8),
        num_persistent_tokens=2,
    )
    fields.update(titans_overrides)
    return tiny_model_config(
        architecture=TITANS_ARCHITECTURE, max_position_embeddings=256, titans=TitansConfig(**fields)
    )


def build_raycake_checkpoint(
    config: ModelConfig,
    out_dir: Path,
    seed: int = 0,
    init_std: float | None = None,
    with_tokenizer: bool = False,
):
    """Save a random raycake ``LlamaForCausalLM`` of ``config`` (weights drawn from N(0, init_std)
    when given, else the modules' own init) and, with ``with_tokenizer``, a byte-level BPE
    tokenizer of its vocabulary; return the model in eval mode."""
    from raycake.model.loader import save_checkpoint
    from raycake.model.titans_mag import build_model

    torch.manual_seed(seed)
    model = build_model(config)
    if init_std is not None:
        for param in model.parameters():
            torch.nn.init.normal_(param, std=init_std)
    save_checkpoint(model, out_dir)
    if with_tokenizer:
        save_tokenizer(train_bpe(_TOKENIZER_TEXT, config.vocab_size), out_dir)
    return model.eval()


@torch.inference_mode()
def training_path_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from the model's training path (no cache): the whole sequence re-run for
    every token, the reference a serving engine must match."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        hidden = model(torch.tensor([tokens]), torch.arange(len(tokens))[None])
        tokens.append(int(model.compute_logits(hidden[0, -1]).argmax()))
    return tokens[len(prompt) :]
