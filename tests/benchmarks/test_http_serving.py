"""benchmarks/http_serving.py's bookkeeping: a row's rates and percentiles from known requests."""

from __future__ import annotations

import pytest

from benchmarks.http_serving import Timed, _row, parse_args


def test_a_row_counts_rates_and_percentiles_from_what_callers_saw():
    done = [
        Timed(text="a", num_tokens=4, ttft_s=0.100, gaps_s=[0.010, 0.030], finish_reason="length"),
        Timed(text="b", num_tokens=4, ttft_s=0.300, gaps_s=[0.020], finish_reason="length"),
        Timed(text="", num_tokens=0, ttft_s=None, finish_reason="rejected"),
    ]
    row = _row("http", 2, done, wall_s=2.0)
    assert (row["requests"], row["finished"]) == (3, 2)
    assert (row["req_per_s"], row["tok_per_s"]) == (1.5, 4.0)
    assert row["ttft_p50_ms"] == pytest.approx(200.0)
    assert row["tbt_p50_ms"] == pytest.approx(20.0)


def test_arguments_are_bounded():
    args = parse_args(["--clients", "1,8", "--turns", "2"])
    assert (args.clients, args.turns, args.client) == ([1, 8], 2, "raw")
    with pytest.raises(SystemExit):
        parse_args(["--clients", "0"])
