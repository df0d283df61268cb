"""The embedded default model as shipped: size, quality against its baseline, parity, the CLI."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from raycake import LLM, SamplingParams
from raycake.assets import default_model_dir
from raycake.cli import main
from raycake.training.corpus import read_texts, split_corpus


def test_ships_within_budget():
    files = list(default_model_dir().iterdir())
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_held_out_loss_beats_the_unigram_baseline():
    report = json.loads((default_model_dir() / "train_report.json").read_text())["report"]
    assert report["held_out_loss"] < 0.5 * report["unigram_loss"]
    # Recompute on one held-out file here rather than trusting the report alone.
    llm = LLM()
    model = llm.engine.model
    text = next(t for t in read_texts(split_corpus().held_out) if len(t) > 4000)
    ids = torch.tensor([llm.tokenizer.encode(text)[:512]])
    with torch.no_grad():
        logits = model.compute_logits(model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None]))
    loss = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert loss < 0.6 * report["unigram_loss"]
    assert math.exp(loss) < 60


def test_transformers_reads_the_shipped_model_identically():
    from transformers import AutoModelForCausalLM

    llm = LLM()
    prompt = "def fibonacci(n):"
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = llm.generate(prompt, greedy)[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir()).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    with torch.no_grad():
        theirs = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24
        )
    assert ours == theirs[0, ids.shape[1] :].tolist()


def test_generate_command_prints_python(capsys):
    assert main(["generate", "def fibonacci(n):", "--max-tokens", "40", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def fibonacci(n):")
    continuation = out.out[len("def fibonacci(n):") :]
    # Python-shaped: a line break followed by indentation, as a function body needs.
    assert continuation.startswith("\n    ")
    assert "40 tokens" in out.err and "finish=length" in out.err
