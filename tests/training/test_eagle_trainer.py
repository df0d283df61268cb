"""`raycake train-eagle` end to end: a small head for the embedded model on a slice of the stdlib."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raycake.assets import default_model_dir
from raycake.cli import main
from raycake.model.eagle import DraftLayerShape, load_eagle_head
from raycake.model.loader import read_model_config
from raycake.training.config import EagleTrainConfig
from raycake.training.eagle_trainer import draft_vocab_coverage, most_frequent_tokens

TINY_HEAD = [
    "--seq-len", "32", "--batch-size", "8", "--steps", "60", "--warmup-steps", "5",
    "--learning-rate", "0.005", "--min-learning-rate", "0.0005", "--eval-every", "30",
    "--eval-windows", "16", "--max-corpus-files", "12",
]  # fmt: skip


@pytest.fixture(scope="module")
def target():
    path = default_model_dir()
    if not (path / "model.safetensors").is_file():
        pytest.skip("the embedded default model is not built")
    return path


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    assert main(["train-eagle", "--out-dir", str(out), "--target", str(target), *TINY_HEAD]) == 0
    return out


def test_writes_head_report_and_plot(head, target):
    for name in ("config.json", "model.safetensors", "train_report.json"):
        assert (head / name).is_file(), name
    assert (head / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((head / "train_report.json").read_text())
    report = data["report"]
    assert report["tokens_seen"] == 60 * 8 * 32
    assert data["config"]["token_loss_weight"] == 0.1
    evals = [h for h in data["history"] if "held_out_accuracy" in h]
    assert [h["step"] for h in evals] == [0, 30, 60]
    # The head loads back for its target and has the layout the engine expects.
    loaded = load_eagle_head(head, read_model_config(target))
    assert sum(p.numel() for p in loaded.parameters()) == report["num_parameters"]
    # The default draft vocabulary: the 1,024 most frequent training tokens.
    assert report["draft_vocab_size"] == 1024 == len(loaded.draft_vocab)
    assert 0.5 < report["draft_vocab_coverage"] < 1.0


def test_most_frequent_tokens_ranks_by_count_then_id():
    tokens = np.array([5, 5, 5, 2, 2, 9, 9, 1, 0])
    assert most_frequent_tokens(tokens, 3, 10) == [2, 5, 9]  # 9 ties with 2, beats 0 and 1
    assert most_frequent_tokens(tokens, 4, 10) == [0, 2, 5, 9]
    assert most_frequent_tokens(tokens, 10, 10) is None  # the whole vocabulary
    assert draft_vocab_coverage(tokens, [2, 5, 9]) == pytest.approx(7 / 9)
    assert draft_vocab_coverage(tokens, None) == 1.0


def test_head_learns_the_targets_greedy_token(head):
    report = json.loads((head / "train_report.json").read_text())["report"]
    # Better than always drafting the target's most frequent greedy token, and than untrained.
    assert report["held_out_accuracy"] > report["majority_accuracy"] + 0.05
    assert report["held_out_accuracy"] > report["untrained_accuracy"] + 0.05
    history = json.loads((head / "train_report.json").read_text())["history"]
    evals = [h["held_out_feature_loss"] for h in history if "held_out_feature_loss" in h]
    assert evals[-1] < evals[0]


def test_same_seed_same_weights(head, target, tmp_path):
    assert (
        main(["train-eagle", "--out-dir", str(tmp_path), "--target", str(target), *TINY_HEAD]) == 0
    )
    first, second = load_file(head / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cached_features_path_and_a_narrow_head(target, tmp_path):
    from raycake.training.eagle_trainer import train_eagle

    cfg = EagleTrainConfig(
        out_dir=str(tmp_path),
        target=str(target),
        seq_len=16,
        batch_size=4,
        steps=4,
        eval_every=4,
        eval_windows=4,
        cache_windows=8,
        max_corpus_files=12,
        head_hidden_size=128,
    )
    report = train_eagle(cfg)
    assert report.tokens_seen == 4 * 4 * 16
    # The embedded model's layer at width 128: 2 heads of 64 sharing 1 kv head, MLP 352.
    loaded = load_eagle_head(tmp_path, read_model_config(target))
    assert loaded.draft_layer == DraftLayerShape(128, 352, 2, 1, 64)
    assert sum(p.numel() for p in loaded.parameters()) == report.num_parameters


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seq_len": 2}, "train_eagle.seq_len"),
        ({"feature_noise": -1.0}, "train_eagle.feature_noise"),
        ({"cache_windows": -1}, "train_eagle.cache_windows"),
        ({"save_dtype": "int8"}, "train_eagle.save_dtype"),
        ({"head_hidden_size": 0}, "train_eagle.head_hidden_size"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EagleTrainConfig(out_dir="x", **kwargs)


def test_unknown_target_is_a_clear_error(tmp_path, capsys):
    assert main(["train-eagle", "--out-dir", str(tmp_path), "--target", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
