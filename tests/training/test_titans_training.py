"""`raycake train --arch titans-mag` on a slice of the stdlib: it learns, its checkpoint loads
and serves the training path's greedy tokens, and its knobs are validated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from raycake import LLM, SamplingParams
from raycake.cli import build_parser, main
from raycake.model.loader import load_model
from raycake.model.titans_mag import TitansMAGForCausalLM
from raycake.training.config import TrainConfig
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.recall import RecallTask, teacher_forced_accuracy
from tests.llama_checkpoints import training_path_greedy

# Window 8, memory chunks of 8 in layer 1 only: the engine's block (4) divides the chunk.
# Memory max_lr 0.1 as the shipped model: at 1.0 (and learning rate 0.01) the memory's values
# grow within a dozen steps until its chunk updates diverge (weights 10 -> 1e23 over five
# chunks) and the loss is NaN.
TINY_TITANS = [
    "--arch", "titans-mag", "--vocab-size", "300", "--hidden-size", "32",
    "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "2",
    "--num-key-value-heads", "1", "--seq-len", "96", "--batch-size", "8", "--steps", "30",
    "--warmup-steps", "4", "--eval-every", "15", "--eval-batches", "1", "--max-corpus-files", "12",
    "--learning-rate", "0.01", "--sliding-window", "8", "--num-persistent-tokens", "2",
    "--memory-layers", "1", "--memory-heads", "2", "--memory-head-dim", "16",
    "--memory-chunk-size", "8", "--memory-max-lr", "0.1", "--recall-fraction", "0.125",
    "--num-threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("titans")
    assert main(["train", "--out-dir", str(out), *TINY_TITANS]) == 0
    return out


def test_learns_and_writes_a_titans_checkpoint(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png"):
        assert (trained / name).is_file(), name
    hf = json.loads((trained / "config.json").read_text())
    assert hf["architectures"] == ["TitansMAGForCausalLM"]
    assert hf["sliding_window"] == 8
    assert hf["titans"]["memory_layers"] == [1]
    assert hf["titans"]["chunk_size"] == 8
    saved = json.loads((trained / "train_report.json").read_text())
    losses = [h["train_loss"] for h in saved["history"] if "train_loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    held = [h["held_out_loss"] for h in saved["history"] if "held_out_loss" in h]
    assert held[-1] < held[0]
    report = saved["report"]
    assert np.isfinite(report["held_out_loss"])
    assert 0.0 <= report["recall_accuracy"] <= 1.0
    assert report["recall_distance"] == 4 * 8
    model = load_model(trained)
    assert isinstance(model, TitansMAGForCausalLM)
    assert sorted(model.memories()) == [1]
    assert report["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_checkpoint_serves_the_training_path_tokens(trained):
    llm = LLM(str(trained), block_size=4)
    text = next(t for t in read_texts(split_corpus().held_out) if len(t) > 500)
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)[:37]  # > window and > chunk
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    served = llm.generate(prompt, greedy)[0].token_ids
    assert served == training_path_greedy(load_model(trained), prompt, 12)


def test_recall_sequences_hold_the_needle_and_its_answer(trained):
    task = RecallTask(Tokenizer.from_file(str(trained / "tokenizer.json")))
    tokens = np.asarray(task.tokenizer.encode("def f(x):\n    return x\n" * 60).ids)
    rng = np.random.default_rng(0)
    seq = task.training_sequence(tokens, 97, rng).tolist()
    assert len(seq) == 97
    text = task.tokenizer.decode(seq)
    key = text.split('passkey = "')[1][:5]
    assert key.isdigit()
    assert f'assert passkey == "{key}"' in text
    samples = task.eval_samples(tokens, 4, distance=32, seed=3)
    assert samples == task.eval_samples(tokens, 4, distance=32, seed=3)
    assert len({s.key for s in samples}) == 4
    for s in samples:
        assert s.prompt[: len(task.needle(s.key))] == task.needle(s.key)
        assert s.prompt[-len(task.query) :] == task.query
        assert len(s.prompt) == len(task.needle(s.key)) + 32 + len(task.query)
    model = load_model(trained)
    assert 0.0 <= teacher_forced_accuracy(model, samples) <= 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"arch": "mamba"}, "train.arch"),
        ({"sliding_window": 0}, "train.sliding_window"),
        ({"memory_chunk_size": 0}, "train.memory_chunk_size"),
        ({"memory_heads": -1}, "train.memory_heads"),
        ({"memory_head_dim": 0}, "train.memory_head_dim"),
        ({"memory_depth": 1}, "train.memory_depth"),
        ({"memory_expansion": 0}, "train.memory_expansion"),
        ({"memory_max_lr": 0.0}, "train.memory_max_lr"),
        ({"memory_max_lr": 2.0}, "train.memory_max_lr"),
        ({"num_persistent_tokens": -1}, "train.num_persistent_tokens"),
        ({"memory_layers": (4,)}, "train.memory_layers"),
        ({"memory_layers": [1]}, "train.memory_layers"),
        ({"recall_fraction": 0.9}, "train.recall_fraction"),
        ({"num_threads": 0}, "train.num_threads"),
        ({"arch": "titans-mag", "num_experts": 4}, "train.num_experts"),
    ],
)
def test_titans_fields_are_validated(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        TrainConfig(out_dir="unused", **overrides)


def test_cli_reads_memory_layers_and_the_recall_task_must_fit(tmp_path, capsys):
    args = build_parser().parse_args(
        ["train", "--out-dir", "x", "--arch", "titans-mag", "--memory-layers", "1,3"]
    )
    assert (args.arch, args.memory_layers) == ("titans-mag", (1, 3))
    # Window 32 puts the needle 128 tokens back: a 96-token context cannot hold the task.
    flags = [*TINY_TITANS, "--sliding-window", "32", "--steps", "1"]
    assert main(["train", "--out-dir", str(tmp_path), *flags]) == 2
    assert "train.seq_len: expected >=" in capsys.readouterr().err
