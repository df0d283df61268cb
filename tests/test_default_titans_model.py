"""The embedded Titans MAG model as shipped: size against the dense model, shape, and serving
that reproduces the training path beyond the window."""

from __future__ import annotations

import json

from raycake import LLM, SamplingParams
from raycake.assets import default_model_dir, default_titans_model_dir, train_command
from raycake.model.loader import load_model, read_model_config
from raycake.model.titans_mag import TitansMAGForCausalLM
from raycake.training.corpus import read_texts, split_corpus
from tests.llama_checkpoints import training_path_greedy


def _report(model_dir) -> dict:
    return json.loads((model_dir / "train_report.json").read_text())


def test_ships_the_checkpoint_report_and_plot_with_the_dense_tokenizer():
    model_dir = default_titans_model_dir()
    files = list(model_dir.iterdir())
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    names = {f.name for f in files}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "loss_curve.png",
        "train_report.json",
    } <= names
    tokenizer = (model_dir / "tokenizer.json").read_bytes()
    assert tokenizer == (default_model_dir() / "tokenizer.json").read_bytes()
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "--arch titans-mag" in train_command("default-titans")


def test_parameter_count_is_within_ten_percent_of_the_dense_model():
    titans = load_model(default_titans_model_dir())
    dense = load_model(default_model_dir())
    count = sum(p.numel() for p in titans.parameters())
    dense_count = sum(p.numel() for p in dense.parameters())
    assert abs(count - dense_count) <= 0.1 * dense_count
    assert count == _report(default_titans_model_dir())["report"]["num_parameters"]


def test_window_memory_and_training_shape():
    config = read_model_config(default_titans_model_dir())
    assert config.is_titans
    titans = config.titans
    # The engine's default block (16) must divide the memory chunk.
    assert titans.memory.chunk_size % 16 == 0
    saved = _report(default_titans_model_dir())
    train = saved["config"]
    # A needle 4 windows back fits the trained context; the held-out loss beats unigram.
    assert 4 * titans.sliding_window < train["seq_len"]
    report = saved["report"]
    assert report["held_out_loss"] < 0.6 * report["unigram_loss"]
    assert report["recall_distance"] == 4 * titans.sliding_window


def test_served_greedy_tokens_equal_the_training_path_beyond_the_window():
    llm = LLM("default-titans")
    window = llm.engine.model.config.titans.sliding_window
    text = next(t for t in read_texts(split_corpus().held_out) if len(t) > 4000)
    # Longer than the window and not a whole number of memory chunks or blocks.
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)[: 3 * window + 7]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    served = llm.generate(prompt, greedy)[0].token_ids
    model = load_model(default_titans_model_dir())
    assert isinstance(model, TitansMAGForCausalLM)
    assert served == training_path_greedy(model, prompt, 24)
