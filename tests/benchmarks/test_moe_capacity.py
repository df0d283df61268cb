"""benchmarks/moe_capacity.py on a tiny random Switch-Llama: drops and loads against hand-derived
values, the dropless loss against the trainer's own ``evaluate``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.moe_capacity import measure, parse_args, token_windows
from raycake.model.loader import load_model, save_checkpoint
from raycake.model.moe import MoEFeedForward
from raycake.training.trainer import evaluate
from tests.llama_checkpoints import SWITCH_MOE, build_raycake_checkpoint, tiny_model_config

NUM_EXPERTS, VOCAB_SIZE, SEQ_LEN, GROUP_TOKENS, NUM_WINDOWS = 4, 96, 32, 64, 8
FACTORS = [0.5, 1.0, 1.25, 2.0, None]  # None: dropless, last


def build_switch_checkpoint(out_dir, collapse_router: bool = False, moe: bool = True) -> None:
    """A random 4-layer Switch-Llama (MoE in layers 1 and 3; dense Llama without ``moe``).
    ``collapse_router`` zeroes every router weight: all logits tie, every token picks one expert."""
    config = tiny_model_config(vocab_size=VOCAB_SIZE, **(SWITCH_MOE if moe else {}))
    assert not moe or config.num_experts == NUM_EXPERTS
    model = build_raycake_checkpoint(config, out_dir)
    if collapse_router:
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoEFeedForward):
                torch.nn.init.zeros_(layer.mlp.gate.weight)
        save_checkpoint(model, out_dir)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB_SIZE, NUM_WINDOWS * SEQ_LEN + 1)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tokens):
    model_dir = tmp_path_factory.mktemp("switch")
    build_switch_checkpoint(model_dir)
    windows = token_windows(tokens, SEQ_LEN, NUM_WINDOWS)
    by_factor = {f: measure(model_dir, windows, f, GROUP_TOKENS) for f in FACTORS}
    return model_dir, by_factor


def test_dropless_drops_nothing_and_scores_like_the_trainer(results, tokens):
    model_dir, by_factor = results
    dropless = by_factor[None]
    assert dropless.capacity is None
    assert sorted(dropless.layers) == [1, 3]
    num_groups = NUM_WINDOWS * SEQ_LEN // GROUP_TOKENS
    for load in dropless.layers.values():
        assert load.routed.shape == (num_groups, NUM_EXPERTS)
        assert load.num_tokens == NUM_WINDOWS * SEQ_LEN
    assert dropless.overall.num_tokens == 2 * NUM_WINDOWS * SEQ_LEN
    for load in [*dropless.layers.values(), dropless.overall]:
        assert load.drop_rate == 0.0
        np.testing.assert_array_equal(load.kept, load.routed)
        assert load.kept_imbalance == load.routed_imbalance >= 1.0
    # Dropless routing is per token, so grouping cannot change the loss: the trainer's number.
    expected = evaluate(load_model(model_dir), tokens, SEQ_LEN, max_windows=NUM_WINDOWS)
    assert dropless.loss == pytest.approx(expected, rel=1e-5)


def test_drops_are_exactly_the_overflow_past_capacity(results):
    _, by_factor = results
    for factor, result in by_factor.items():
        if factor is None:
            continue
        capacity = math.ceil(GROUP_TOKENS / NUM_EXPERTS * factor)
        assert result.capacity == capacity
        for load in result.layers.values():
            # Top-1, first come first served: an expert keeps min(routed, capacity) tokens.
            np.testing.assert_array_equal(load.kept, np.minimum(load.routed, capacity))
            overflow = np.maximum(load.routed - capacity, 0).sum()
            assert load.drop_rate == pytest.approx(overflow / load.num_tokens)
            # The busiest expert alone overflows by at least max_load - capacity per group.
            bound = load.routed_imbalance / NUM_EXPERTS - capacity / GROUP_TOKENS
            assert load.drop_rate >= bound - 1e-12
            # Clipping loads at the capacity can only even them out (max over mean falls).
            assert 1.0 <= load.kept_imbalance <= load.routed_imbalance + 1e-12
            assert load.routed_imbalance <= NUM_EXPERTS


def test_drop_rate_falls_as_capacity_grows(results):
    _, by_factor = results
    # Layer 1 is the first MoE layer: its input, so its routing, is the same at every factor.
    first = [by_factor[f].layers[1] for f in FACTORS]
    for load in first[1:]:
        np.testing.assert_array_equal(load.routed, first[0].routed)
    rates = [load.drop_rate for load in first]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] > 0.0 and rates[-1] == 0.0
    assert by_factor[0.5].loss != by_factor[None].loss  # dropping changes what the model says


def test_one_expert_taking_every_token_drops_all_past_capacity(tmp_path, tokens):
    build_switch_checkpoint(tmp_path, collapse_router=True)
    windows = token_windows(tokens, SEQ_LEN, NUM_WINDOWS)
    for factor in [1.0, 1.25, 2.0]:
        result = measure(tmp_path, windows, factor, GROUP_TOKENS)
        for load in [*result.layers.values(), result.overall]:
            assert load.routed_imbalance == NUM_EXPERTS
            assert load.kept_imbalance == NUM_EXPERTS
            assert load.drop_rate == pytest.approx(1 - result.capacity / GROUP_TOKENS)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--capacity-factors", "1.0", "0"], "must be a finite number > 0"),
        (["--capacity-factors", "-1.25"], "must be a finite number > 0"),
        (["--capacity-factors", "nan"], "must be a finite number > 0"),
        (["--group-tokens", "300"], "--group-tokens: 300 is not a multiple of --seq-len 256"),
        (["--max-windows", "4"], "--max-windows: 4 windows"),
        (["--group-tokens", "0"], "--group-tokens: must be >= 1"),
    ],
)
def test_bad_flags_are_refused_by_name(tmp_path, capsys, flags, message):
    build_switch_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_a_missing_model_a_dense_model_or_no_tokenizer_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path / "absent")])
    assert "neither an embedded model" in capsys.readouterr().err
    build_switch_checkpoint(tmp_path, moe=False)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path)])
    assert "applies to a Switch (top-1) MoE checkpoint" in capsys.readouterr().err
    build_switch_checkpoint(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path)])
    assert "tokenizer.json not found" in capsys.readouterr().err
