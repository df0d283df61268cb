"""Checkpoint loading and saving against transformers: logits, sharding, dtypes, broken folders."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from raycake.model.config import RopeScaling
from raycake.model.llama import LlamaForCausalLM
from raycake.model.loader import CheckpointError, load_model
from tests.llama_checkpoints import TinyLlama, build_raycake_checkpoint, tiny_model_config

VOCAB_SIZE = 128


def hf_llama_config(tie_word_embeddings: bool = False) -> LlamaConfig:
    spec = TinyLlama("loader", 4, 2, tie_word_embeddings=tie_word_embeddings)
    return LlamaConfig(**{**spec.hf_kwargs(), "vocab_size": VOCAB_SIZE})


def save_hf_llama(
    out_dir: Path, tie_word_embeddings: bool = False, **save_kwargs
) -> HFLlamaForCausalLM:
    """A random transformers Llama, saved as safetensors into ``out_dir``."""
    torch.manual_seed(0)
    model = HFLlamaForCausalLM(hf_llama_config(tie_word_embeddings)).eval()
    model.save_pretrained(out_dir, **save_kwargs)
    return model


def example_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, positions), both [B, S]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_SIZE, (batch, seq), generator=generator)
    return ids, torch.arange(seq).expand(batch, seq)


@torch.no_grad()
def raycake_logits(
    model: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    return model.compute_logits(model(ids, positions))  # [B, S, V]


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()  # [B, S, V]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_checkpoint(request, tmp_path_factory) -> tuple[Path, HFLlamaForCausalLM]:
    out_dir = tmp_path_factory.mktemp("tied" if request.param else "untied")
    return out_dir, save_hf_llama(out_dir, tie_word_embeddings=request.param)


def test_fp32_logits_match_transformers(hf_checkpoint):
    model_dir, hf_model = hf_checkpoint
    model = load_model(model_dir)
    ids, positions = example_ids()
    torch.testing.assert_close(
        raycake_logits(model, ids, positions), hf_logits(hf_model, ids), atol=1e-5, rtol=1e-5
    )
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads_identically(tmp_path, hf_checkpoint):
    model_dir, _ = hf_checkpoint
    sharded = tmp_path / "sharded"
    hf_model = HFLlamaForCausalLM.from_pretrained(model_dir)
    hf_model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    ids, positions = example_ids()
    assert torch.equal(
        raycake_logits(load_model(sharded), ids, positions),
        raycake_logits(load_model(model_dir), ids, positions),
    )


def test_bfloat16_load(hf_checkpoint):
    model_dir, hf_model = hf_checkpoint
    model = load_model(model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, positions = example_ids()
    expected = hf_logits(hf_model, ids)
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        raycake_logits(model, ids, positions), expected, atol=0.05 * scale, rtol=0
    )


def test_bfloat16_rope_matches_transformers_at_long_distances(hf_checkpoint):
    """RoPE frequencies stay fp32 in a bf16 model, as in transformers; rounding them to bf16
    rotates distant tokens by visibly wrong angles."""
    model_dir, _ = hf_checkpoint
    model = load_model(model_dir, dtype="bfloat16")
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    hf_model = HFLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids, positions = example_ids(batch=1, seq=256)
    diff = (raycake_logits(model, ids, positions) - hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= 0.125, f"bf16 logits differ from transformers' bf16 by {diff}"


# --- broken checkpoint folders -----------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("good")
    save_hf_llama(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def good_sharded_checkpoint(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("good_sharded")
    save_hf_llama(out_dir, max_shard_size="60KB")
    return out_dir


def _edit_config(model_dir: Path, edit: Callable[[dict], dict]) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _edit_tensors(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _gpt2_config(model_dir: Path) -> None:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4).to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))


def _drop_first_shard(model_dir: Path) -> None:
    sorted(model_dir.glob("model-*.safetensors"))[0].unlink()


def _truncate_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


BROKEN = {
    # case: (edit of a good single-file checkpoint, substrings the error message must contain)
    "missing-config": (lambda d: (d / "config.json").unlink(), ["config.json", "not found"]),
    "invalid-json": (lambda d: (d / "config.json").write_text("{oops"), ["config.json", "JSON"]),
    "architecture-swapped": (
        lambda d: _edit_config(d, lambda c: {**c, "architectures": ["GPT2LMHeadModel"]}),
        ["GPT2LMHeadModel"],
    ),
    # A real GPT-2 config.json lacks Llama's fields; the message must still name the architecture.
    "gpt2-config": (_gpt2_config, ["GPT2LMHeadModel"]),
    "no-safetensors": (lambda d: (d / "model.safetensors").unlink(), ["no *.safetensors"]),
    "truncated-safetensors": (_truncate_weights, ["model.safetensors"]),
    "wrong-shape": (
        lambda d: _edit_tensors(
            d, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(97, 64)})
        ),
        ["model.layers.0.mlp.up_proj.weight", "(97, 64)", "(96, 64)"],
    ),
    "missing-tensor": (
        lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")),
        ["lacks", "model.norm.weight"],
    ),
    # One part of a fused projection: q and v present, k missing.
    "missing-fused-part": (
        lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
        ["lacks", "model.layers.1.self_attn"],
    ),
    "unexpected-tensor": (
        lambda d: _edit_tensors(d, lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
        ["model.extra.weight"],
    ),
}

BROKEN_SHARDED = {
    "index-names-missing-shard": (_drop_first_shard, ["model-00001-of-", "missing"]),
    "index-invalid-json": (
        lambda d: (d / "model.safetensors.index.json").write_text("{oops"),
        ["model.safetensors.index.json"],
    ),
}


def _assert_load_fails(model_dir: Path, expected: list[str]) -> None:
    with pytest.raises(CheckpointError) as info:
        load_model(model_dir)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in error message {message!r}"


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_named(case, good_checkpoint, tmp_path):
    edit, expected = BROKEN[case]
    model_dir = shutil.copytree(good_checkpoint, tmp_path / case)
    edit(model_dir)
    _assert_load_fails(model_dir, expected)


@pytest.mark.parametrize("case", list(BROKEN_SHARDED))
def test_broken_sharded_checkpoint_is_named(case, good_sharded_checkpoint, tmp_path):
    edit, expected = BROKEN_SHARDED[case]
    model_dir = shutil.copytree(good_sharded_checkpoint, tmp_path / case)
    edit(model_dir)
    _assert_load_fails(model_dir, expected)


# --- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tie_word_embeddings, llama3_rope",
    [(False, False), (True, True)],
    ids=["untied", "tied-llama3"],
)
def test_save_checkpoint_loads_in_transformers(tmp_path, tie_word_embeddings, llama3_rope):
    config = tiny_model_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16) if llama3_rope else None,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = build_raycake_checkpoint(config, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.config.tie_word_embeddings == tie_word_embeddings
    # Positions past original_max_position_embeddings exercise the llama3 frequency scaling.
    ids, positions = example_ids(seq=40)
    expected = raycake_logits(model, ids, positions)
    torch.testing.assert_close(hf_logits(hf_model, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(raycake_logits(load_model(tmp_path), ids, positions), expected)
