"""`raycake train` end to end on a slice of the stdlib: files, learning, reproducibility, loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from raycake import LLM, SamplingParams
from raycake.cli import main
from raycake.training.corpus import split_corpus

TINY = [
    "--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64",
    "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1",
    "--seq-len", "32", "--batch-size", "8", "--steps", "40", "--warmup-steps", "4",
    "--eval-every", "20", "--eval-batches", "1", "--max-corpus-files", "12", "--learning-rate", "0.01",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--out-dir", str(out), *TINY]) == 0
    return out


def test_writes_a_hugging_face_folder_with_report_and_plot(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (trained / name).is_file(), name
    assert (trained / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((trained / "train_report.json").read_text())["report"]
    # 40 steps already beat a uniform guess over the vocabulary by a wide margin...
    assert report["held_out_loss"] < 0.8 * math.log(300)
    assert math.isclose(
        report["held_out_perplexity"], math.exp(report["held_out_loss"]), rel_tol=1e-9
    )
    assert report["tokens_seen"] == 40 * 8 * 32


def test_same_seed_same_weights(trained, tmp_path):
    assert main(["train", "--out-dir", str(tmp_path), *TINY]) == 0
    first, second = (
        load_file(trained / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_trained_folder_serves_in_raycake_and_loads_in_transformers(trained):
    from transformers import AutoModelForCausalLM

    llm = LLM(str(trained))
    prompt = "import os\n"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    ids = llm.tokenizer.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(trained).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        expected = hf.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=8
        )[0, len(ids) :].tolist()
    assert out.token_ids == expected


def test_corpus_split_is_stable_and_disjoint():
    split = split_corpus()
    assert split.held_out and split.train
    assert not set(split.train) & set(split.held_out)
    assert split_corpus().held_out == split.held_out
    # About 2% of files are held out.
    assert 0.005 < len(split.held_out) / (len(split.train) + len(split.held_out)) < 0.05


def test_switch_moe_variant_trains_with_capacity_and_serves(trained, tmp_path):
    """--num-experts: Switch FFN in every other layer, same tokenizer, active params ~ dense."""
    moe_flags = [
        "--num-hidden-layers", "2", "--num-experts", "4", "--capacity-factor", "1.0",
        "--tokenizer-dir", str(trained),
    ]  # fmt: skip
    assert main(["train", "--out-dir", str(tmp_path), *TINY, *moe_flags]) == 0
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["SwitchLlamaForCausalLM"]
    assert (hf["num_local_experts"], hf["decoder_sparse_step"]) == (4, 2)
    assert (tmp_path / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    report = json.loads((tmp_path / "train_report.json").read_text())["report"]
    expert = 3 * 32 * 64  # one SwiGLU expert: gate, up, down
    router = 32 * 4
    assert report["num_parameters"] - report["num_active_parameters"] == 3 * expert
    # Active = a dense 2-layer model of the same widths plus the router.
    dense_2_layers = 300 * 32 + 2 * (32 * (32 + 2 * 16) + 32 * 32 + expert + 2 * 32) + 32
    assert report["num_active_parameters"] == dense_2_layers + router
    # At capacity factor 1.0 tokens overflow: routing is never perfectly even (and a
    # 40-step model's hidden states barely differ between tokens, so most are dropped).
    assert 0.0 < report["train_drop_rate"] < 1.0
    assert 1.0 < report["train_imbalance"] <= 4.0
    assert report["held_out_loss"] < 0.8 * math.log(300)
    llm = LLM(str(tmp_path))
    out = llm.generate("import os\n", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(out[0].token_ids) == 6
