"""The step profile's phases add up to the step and its operator shares to the whole."""

from __future__ import annotations

import sys

import pytest

from benchmarks import engine_vs_vllm
from benchmarks.step_profile import family, profile_run


def test_phases_add_up_to_the_step_and_shares_to_one():
    row = profile_run("float32", batch=2, new_tokens=4, prompt_tokens=16)
    phases = ["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "engine_rest_ms"]
    assert all(row[p] >= 0 for p in phases)
    assert sum(row[p] for p in phases) == pytest.approx(row["step_ms"])
    assert row["forward_ms"] > row["schedule_ms"]
    shares = [row[f"{f}_share"] for f in ("matmul", "attention", "norm", "other_ops")]
    assert sum(shares) == pytest.approx(1.0)
    assert row["matmul_share"] > 0 and row["attention_share"] > 0


def test_operator_families():
    assert family("mkldnn::_linear_pointwise") == "matmul"
    assert family("aten::index_select") == "attention"
    assert family("aten::silu") == "other_ops"


def test_engine_vs_vllm_needs_the_vllm_python(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["engine_vs_vllm"])
    with pytest.raises(SystemExit):
        engine_vs_vllm.main()
    assert "--vllm-python" in capsys.readouterr().err
