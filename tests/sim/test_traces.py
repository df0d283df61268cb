"""Mooncake trace reading, validation, generation and rescaling."""

from __future__ import annotations

import itertools
import json
import statistics

import pyarrow as pa
import pytest

from raycake.sim.traces import (
    TRACE_SCHEMA,
    SyntheticTraceConfig,
    TraceFormatError,
    generate_trace,
    head,
    prefix_reuse_ceiling,
    read_trace,
    repeat,
    speed_up,
    trace_from_rows,
    write_trace,
)


def _line(ts=0, n_in=600, n_out=20, hashes=(0, 1)) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(hashes)}
    )


def test_reads_a_trace_into_the_schema(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(_line() + "\n\n" + _line(ts=1500, n_in=512, n_out=1, hashes=[0]) + "\n")
    table = read_trace(path)
    assert table.schema == TRACE_SCHEMA
    assert table.column("timestamp_ms").to_pylist() == [0, 1500]
    assert table.column("input_length").to_pylist() == [600, 512]
    assert table.column("hash_ids").to_pylist() == [[0, 1], [0]]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"timestamp": 0, "input_length": 600, "hash_ids": [0, 1]}), "output_length"),
        (_line(n_in="600"), "input_length: expected an integer >= 1"),
        (_line(ts=-5), "timestamp"),
        (_line(hashes=[0, "x"]), "hash_ids: expected a list of integers"),
        (_line(n_in=1025, hashes=[0, 1]), "expected ceil(input_length / 512) = 3 ids"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_are_reported_with_their_line_numbers(tmp_path, bad_line, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([_line(), _line(), bad_line, _line()]) + "\n")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert info.value.errors[0][0] == 3
    assert message in info.value.errors[0][1]
    assert "line 3:" in str(info.value)


def test_many_errors_are_counted_beyond_the_listed_ones(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(_line() + "\n" + "{bad\n" * 25)
    with pytest.raises(TraceFormatError, match="25 malformed") as info:
        read_trace(path)
    assert [n for n, _ in info.value.errors] == list(range(2, 12))
    assert "15 more" in str(info.value)


def test_a_file_that_is_not_a_trace_fails_clearly(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("timestamp,input_length\n0,600\n")
    with pytest.raises(ValueError, match="not a Mooncake JSONL trace"):
        read_trace(csv)
    binary = tmp_path / "t.parquet"
    binary.write_bytes(b"PAR1\x00\xff\xfe")
    with pytest.raises(ValueError, match="not a Mooncake JSONL trace"):
        read_trace(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty trace"):
        read_trace(empty)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("arrival", ["poisson", "gamma", "mmpp"])
def test_generated_traces_round_trip_and_have_the_asked_rate(tmp_path, arrival):
    config = SyntheticTraceConfig(num_requests=2000, rate_per_s=5.0, arrival=arrival, seed=3)
    table = generate_trace(config, tmp_path / "g.jsonl")
    assert read_trace(tmp_path / "g.jsonl").equals(table)
    timestamps = table.column("timestamp_ms").to_pylist()
    gaps = [b - a for a, b in itertools.pairwise(timestamps)]
    assert statistics.mean(gaps) == pytest.approx(200, rel=0.15)
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    if arrival == "poisson":
        assert cv == pytest.approx(1.0, abs=0.1)
    else:
        assert cv > 1.15  # bursty
    # Seeded: the same config gives the same trace.
    assert generate_trace(config).equals(table)


def test_generated_sessions_share_growing_prefixes():
    table = generate_trace(
        SyntheticTraceConfig(num_requests=600, session_share=1.0, agent_share=0.0, seed=1)
    )
    hashes = table.column("hash_ids").to_pylist()
    lengths = table.column("input_length").to_pylist()
    # Some later turn extends an earlier prompt: all of the earlier prompt's full blocks lead it.
    extended = sum(
        any(
            lengths[j] > lengths[i]
            and hashes[j][: lengths[i] // 512] == hashes[i][: lengths[i] // 512]
            for j in range(i + 1, min(i + 40, len(hashes)))
        )
        for i in range(200)
        if lengths[i] >= 512
    )
    assert extended > 50
    assert 0.3 < prefix_reuse_ceiling(table) < 0.95


def test_prefix_reuse_ceiling_on_a_hand_built_trace():
    table = trace_from_rows(
        [
            {"timestamp": 0, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},
            # Shares 2 blocks; its own 3rd block differs.
            {"timestamp": 1, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 4]},
            # Same prompt as the first: only (1536 - 1) // 512 = 2 blocks are reusable.
            {"timestamp": 2, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},
        ]
    )
    assert prefix_reuse_ceiling(table) == pytest.approx(4 * 512 / (3 * 1536))


def test_speed_up_head_and_repeat():
    table = trace_from_rows(
        [
            {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [5]},
            {"timestamp": 1000, "input_length": 600, "output_length": 2, "hash_ids": [5, 6]},
        ]
    )
    assert speed_up(table, 2.0).column("timestamp_ms").to_pylist() == [0, 500]
    assert head(table, 1).num_rows == 1
    doubled = repeat(table, 2)
    assert doubled.column("timestamp_ms").to_pylist() == [0, 1000, 2000, 3000]
    assert doubled.column("hash_ids").to_pylist() == [[5], [5, 6], [12], [12, 13]]
    with pytest.raises(ValueError, match="speed factor"):
        speed_up(table, 0)
    with pytest.raises(ValueError, match="num_requests"):
        head(table, 0)


def test_write_then_read(tmp_path):
    table = trace_from_rows(
        [{"timestamp_ms": 7, "input_length": 513, "output_length": 3, "hash_ids": [1, 2]}]
    )
    assert read_trace(write_trace(table, tmp_path / "w.jsonl")).equals(table)
    assert isinstance(table, pa.Table)


def test_synthetic_config_is_validated():
    with pytest.raises(ValueError, match=r"synthetic_trace\.arrival"):
        SyntheticTraceConfig(arrival="uniform")
    with pytest.raises(ValueError, match=r"synthetic_trace\.rate_per_s"):
        SyntheticTraceConfig(rate_per_s=0)
    with pytest.raises(ValueError, match="agent_share"):
        SyntheticTraceConfig(session_share=0.8, agent_share=0.5)
