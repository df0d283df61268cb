"""The model's config: Hugging Face ``config.json`` as published, and bad fields named."""

from __future__ import annotations

import pytest

from raycake.model.config import ModelConfig

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_reads_the_llama_3_1_config_as_published():
    config = ModelConfig.from_hf_config(LLAMA_3_1_8B)
    assert config.head_dim == 128
    assert config.num_queries_per_kv == 4
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    assert config.eos_token_ids == (128001, 128008, 128009)
    round_trip = ModelConfig.from_hf_config(config.to_hf_config())
    assert round_trip == config


def test_reads_transformers_5_rope_parameters():
    hf = dict(LLAMA_3_1_8B)
    hf.pop("rope_theta")
    hf["rope_parameters"] = {**hf.pop("rope_scaling"), "rope_theta": 500000.0}
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_theta == 500000.0 and config.rope_scaling is not None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ],
)
def test_bad_model_config_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**LLAMA_3_1_8B, **change})


def test_missing_required_field_is_named():
    hf = dict(LLAMA_3_1_8B)
    del hf["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_hf_config(hf)
