"""``raycake simulate`` end to end on a small generated trace."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

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


def test_simulate_with_planners_on_a_generated_load(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["simulate", "--load", "diurnal", "--num-requests", "600", "--rate", "40"]
    args += ["--load-period", "60", "--model", "llama3-8b", "--ttft-slo", "1", "--max-prefill", "4"]
    code = main([*args, "--planner", "fixed,slo", "--startup", "2", "--cooldown", "5"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "within SLO" in lines[0] and "inst-hours" in lines[0]
    fixed, slo = (line.split() for line in lines[1:3])
    assert (fixed[0], slo[0]) == ("fixed", "slo") and fixed[2] == slo[2] == "600"
    # The slo planner adds prefill instances; fixed stays at the minimum (1P + 1D).
    assert fixed[-2] == "1/1" and slo[-2] != "1/1"
    code = main([*args, "--planner", "slo", "--startup", "2", "--json", "--out", str(out)])
    assert code == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    timeline = pq.read_table(out / "timeline_cache_aware_slo.parquet")
    times = timeline.column("time_s").to_pylist()
    counts = timeline.column("num_prefill").to_pylist()
    paid = sum(c * (b - a) for c, a, b in zip(counts, times, times[1:], strict=False))
    assert row["planner"] == "slo" and row["prefill_instance_s"] == pytest.approx(paid)
    assert row["instance_hours"] == pytest.approx((paid + row["decode_instance_s"]) / 3600)
    assert (out / "instances.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_varies_a_trace_files_rate(tmp_path, capsys):
    trace = str(_trace(tmp_path))
    args = ["simulate", "--trace", trace, "--model", "llama3-8b", "--json", "--prefill", "2"]
    last_arrival = {}
    for name, extra in (("plain", []), ("faster", ["--load", "bursty", "--load-low", "2"])):
        out = tmp_path / name
        assert main([*args, "--decode", "2", *extra, "--load-peak", "6", "--out", str(out)]) == 0
        table = pq.read_table(out / "requests_cache_aware_2x2_1x.parquet")
        assert table.num_rows == 150
        last_arrival[name] = max(table.column("arrival_s").to_pylist())
    capsys.readouterr()
    # At least twice the rate everywhere: the same requests arrive in at most half the time.
    assert last_arrival["faster"] <= 0.5 * last_arrival["plain"] + 0.01
    assert main([*args, "--planner", "fastest"]) == 2
    assert "unknown ['fastest']" in capsys.readouterr().err
    assert main(["simulate", "--model", "llama3-8b"]) == 2
    assert "--trace: required unless --load" in capsys.readouterr().err
