"""``raycake simulate`` end to end on a small generated trace."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from raycake.cli import main
from raycake.sim.traces import SyntheticTraceConfig, generate_trace


def _trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    generate_trace(SyntheticTraceConfig(num_requests=150, rate_per_s=10.0, seed=2), path)
    return path


def test_simulate_runs_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--trace",
            str(_trace(tmp_path)),
            "--prefill",
            "2",
            "--decode",
            "2",
            "--gpu",
            "h100",
            "--model",
            "llama3-8b",
            "--policy",
            "cache_aware",
            "--ttft-slo",
            "30",
            "--tbt-slo",
            "0.1",
            "--num-requests",
            "100",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "cache_aware" in captured.out and "hit rate" in captured.out
    assert "reuse ceiling" in captured.err
    assert pq.read_table(out / "requests_cache_aware_2x2_1x.parquet").num_rows == 100
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert pq.read_table(out / "summary.parquet").num_rows == 1


def test_simulate_sweeps_as_json(tmp_path, capsys):
    code = main(
        [
            "simulate",
            "--trace",
            str(_trace(tmp_path)),
            "--model",
            "llama3-8b",
            "--sweep-policies",
            "round_robin,cache_aware_local,cache_aware",
            "--sweep-instances",
            "1x1,2x2",
            "--speed",
            "2",
            "--sweep-rates",
            "1,2",
            "--no-early-rejection",
            "--store-capacity-blocks",
            "1000",
            "--json",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 * 2 * 2
    assert {row["rate"] for row in rows} == {2.0, 4.0}
    assert all(row["num_rejected"] == 0 for row in rows)  # no early rejection


def test_simulate_local_cache_only_fetches_nothing(tmp_path, capsys):
    args = ["simulate", "--trace", str(_trace(tmp_path)), "--model", "llama3-8b", "--json"]
    assert main([*args, "--prefill", "4", "--prefill-cache-blocks", "50"]) == 0
    (with_store,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (
        main([*args, "--prefill", "4", "--prefill-cache-blocks", "50", "--local-cache-only"]) == 0
    )
    (local,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert local["store_hit_rate"] == 0 and with_store["store_hit_rate"] > 0
    assert with_store["cache_hit_rate"] >= local["cache_hit_rate"]


def test_simulate_reports_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}'
    bad.write_text(good + "\n" + '{"timestamp": 1, "input_length": 10}\n')
    assert main(["simulate", "--trace", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    trace = str(_trace(tmp_path))
    assert main(["simulate", "--trace", trace, "--policy", "fastest"]) == 2
    assert "unknown ['fastest']" in capsys.readouterr().err
