"""``raycake bench``: the report's numbers, its JSON, and the command line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from raycake.bench import (
    BenchConfig,
    corpus_prompts,
    percentile,
    random_prompts,
    run_bench,
    weight_bytes,
)
from raycake.cli import main
from raycake.model.config import MoEConfig
from raycake.model.loader import load_model
from raycake.model.tokenizer import Tokenizer
from tests.llama_checkpoints import CONFIGS, VOCAB_SIZE, build_checkpoint, build_mixtral_checkpoint

TIED = CONFIGS[2]  # tied embeddings, head_dim unlike hidden / heads


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-mixtral")
    return str(out), build_mixtral_checkpoint(out, 4)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-tied-llama")
    return str(out), build_checkpoint(TIED, out)


@pytest.mark.parametrize(("dtype", "element_size"), [("float32", 4), ("bfloat16", 2)])
def test_weight_bytes_counts_tied_embeddings_once(tied_llama, dtype, element_size):
    model_dir, hf_model = tied_llama
    hidden, heads, kv_heads, head_dim = 64, TIED.num_attention_heads, TIED.num_key_value_heads, 12
    intermediate = 3 * hidden // 2
    per_layer = (
        hidden * (heads + 2 * kv_heads) * head_dim  # q, k, v
        + heads * head_dim * hidden  # o
        + 3 * hidden * intermediate  # gate, up, down
        + 2 * hidden  # two RMSNorms
    )
    num_params = VOCAB_SIZE * hidden + 2 * per_layer + hidden  # embedding (= lm_head), final norm
    assert num_params == sum(p.numel() for p in hf_model.parameters())
    assert weight_bytes(load_model(model_dir, dtype=dtype)) == num_params * element_size


def test_int8_weight_bytes_are_one_byte_per_projection_weight_plus_scales(tied_llama):
    """LLM.int8(): projections in int8 + an fp32 scale per output channel; the rest bf16."""
    model_dir, _ = tied_llama
    bf16 = weight_bytes(load_model(model_dir, dtype="bfloat16"))
    int8 = weight_bytes(load_model(model_dir, dtype="bfloat16", quantization="int8"))
    hidden, heads, kv_heads, head_dim = 64, TIED.num_attention_heads, TIED.num_key_value_heads, 12
    intermediate = 3 * hidden // 2
    projection_weights = 2 * (
        hidden * (heads + 2 * kv_heads) * head_dim
        + heads * head_dim * hidden
        + 3 * hidden * intermediate
    )
    out_channels = 2 * ((heads + 2 * kv_heads) * head_dim + hidden + 2 * intermediate + hidden)
    assert bf16 - int8 == projection_weights * (2 - 1) - 4 * out_channels
    report = run_bench(
        BenchConfig(model=model_dir, dtype="bfloat16", quantization="int8", num_prompts=2,
                    input_len=8, output_len=2)
    )  # fmt: skip
    assert report.weight_bytes == int8 and "int8 weights" in report.format_text()
    # Where int8 really runs, per layer: 4 projections in each of the 2 layers.
    assert len(report.int8_layers) == 2 * 4
    for layer in report.int8_layers:
        # A token's outlier columns are among its window's: decode runs at least as much in int8.
        assert 0 <= layer.int8_share_window <= layer.int8_share_token <= 1
    assert "int8 share of multiply-adds" in report.format_text()


def test_weight_bytes_of_a_mixtral_model_match_transformers(mixtral):
    model_dir, hf_model = mixtral
    num_params = sum(p.numel() for p in hf_model.parameters())
    assert weight_bytes(load_model(model_dir)) == 4 * num_params


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 9.0, 2.5, 7.0]
    for q in (0, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_prompts_are_deterministic_per_seed(mixtral):
    tokenizer = Tokenizer.from_dir(mixtral[0])
    first = corpus_prompts(random.Random(3), tokenizer, 4, 24)
    assert first == corpus_prompts(random.Random(3), tokenizer, 4, 24)
    assert [len(p) for p in first] == [24] * 4
    assert random_prompts(random.Random(3), 300, 2, 5) == random_prompts(
        random.Random(3), 300, 2, 5
    )


def test_moe_report_counts_every_computed_token_and_serializes(mixtral):
    config = BenchConfig(
        model=mixtral[0],
        num_prompts=4,
        input_len=20,
        output_len=3,
        moe=MoEConfig(router="switch", capacity_factor=1.0),
    )
    report = run_bench(config)
    assert report.num_requests == 4
    assert report.prompt_tokens == 80 and report.output_tokens == 12
    assert report.output_tokens_per_s == pytest.approx(12 / report.elapsed_s)
    assert report.ttft_p50_ms is not None and report.tbt_p90_ms is not None
    assert report.weight_bytes == weight_bytes(load_model(mixtral[0]))
    assert report.router == "switch"
    # The warm-up is not in the load: each prompt token and each output token but the last.
    num_tokens = 80 + 4 * (3 - 1)
    assert [load.layer for load in report.moe_layers] == [0, 1]
    for load in report.moe_layers:
        assert load.num_assignments == num_tokens  # switch: top-1
        assert sum(load.tokens_per_expert) == num_tokens - load.num_dropped
        assert load.drop_rate == pytest.approx(load.num_dropped / num_tokens)
        assert sum(load.assigned_per_expert) == num_tokens
        assert all(
            k <= a for k, a in zip(load.tokens_per_expert, load.assigned_per_expert, strict=True)
        )

    data = json.loads(report.to_json())
    assert {
        "num_requests",
        "prompt_tokens",
        "output_tokens",
        "elapsed_s",
        "requests_per_s",
        "output_tokens_per_s",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "tbt_p50_ms",
        "tbt_p90_ms",
        "weight_bytes",
        "moe_layers",
    } <= data.keys()
    assert data["config"]["moe"] == {
        "router": "switch",
        "capacity_factor": 1.0,
        "num_expert_shards": 0,
        "expert_transport": "auto",
    }
    assert data["moe_layers"][0]["tokens_per_expert"] == list(
        report.moe_layers[0].tokens_per_expert
    )
    text = report.format_text()
    assert "MoE expert load" in text and "kept imbalance" in text


def test_dense_report_has_no_moe_section(tied_llama):
    report = run_bench(BenchConfig(model=tied_llama[0], num_prompts=2, input_len=8, output_len=1))
    assert report.moe_layers == () and report.router is None
    assert report.tbt_p50_ms is None  # one output token: no gap between tokens
    assert "MoE" not in report.format_text()


def test_cli_writes_the_json_report(mixtral, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["bench", "--model", mixtral[0], "--num-prompts", "2", "--input-len", "8"]
    argv += ["--output-len", "2", "--dataset", "corpus", "--json", "--output", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["dataset"] == "corpus"
    assert json.loads(out.read_text())["output_tokens"] == printed["output_tokens"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-prompts", "0"], "num_prompts: expected a positive integer, got 0"),
        (["--input-len", "-3"], "input_len"),
        (["--capacity-factor", "0"], "moe.capacity_factor"),
        (["--max-num-seqs", "4096"], "scheduler.max_num_batched_tokens"),
        (["--output", "/nonexistent-dir/report.json"], "--output"),
        (["--temperature", "-1"], "temperature: expected a finite number >= 0"),
        (["--compare-plain"], "compare_plain: needs speculative"),
        (["--speculative", "eagle", "--max-depth", "0"], "speculative.max_depth"),
        (["--speculative", "eagle", "--compile-decode"], "compile_decode: expected false"),
    ],
)
def test_cli_rejects_bad_flags_before_loading_a_model(flags, message, capsys):
    assert main(["bench", "--model", "/nonexistent-model", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raycake bench: error:") and message in err


def test_cli_rejects_a_workload_longer_than_the_model(mixtral, capsys):
    # The tiny Mixtral has 256 positions.
    argv = ["bench", "--model", mixtral[0], "--input-len", "250", "--output-len", "10"]
    assert main(argv) == 2
    assert "max_model_len 256" in capsys.readouterr().err


def test_speculative_report_on_the_embedded_model(capsys):
    """Greedy EAGLE on the embedded model and its head: the speculation section's numbers are
    consistent with each other, and the plain run is the same workload."""
    argv = ["bench", "--dataset", "corpus", "--num-prompts", "3", "--input-len", "32"]
    argv += ["--output-len", "24", "--max-num-seqs", "1", "--temperature", "0"]
    argv += ["--speculative", "eagle", "--num-draft-tokens", "3", "--max-depth", "3"]
    assert main([*argv, "--compare-plain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    spec = report["spec"]
    assert report["output_tokens"] == 72
    assert spec["policy"] == "fixed" and spec["num_draft_tokens"] == 3
    # Up to 3 drafts and the bonus token per target pass; the trained head gets some accepted.
    assert 1.5 < spec["mean_acceptance_length"] <= 4.0
    # accepted = (length - 1) x passes, drafted <= 3 x passes (fewer near max_tokens).
    assert spec["acceptance_rate"] >= (spec["mean_acceptance_length"] - 1) / 3 - 1e-9
    assert spec["request_acceptance_p10"] <= spec["request_acceptance_p50"]
    assert spec["request_acceptance_p50"] <= spec["request_acceptance_p90"]
    assert spec["speculating_step_share"] > 0.5 and 0 < spec["draft_time_share"] < 1
    assert spec["measured_speedup"] == pytest.approx(
        report["output_tokens_per_s"] / spec["plain_output_tokens_per_s"]
    )
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "speculative decoding: eagle, policy fixed" in text and "tokens per target pass" in text
