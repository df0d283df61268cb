"""The shared validation helper: what it accepts, and messages that name the field and the bound."""

from __future__ import annotations

import math

import pytest

from raycake.validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    from_mapping,
    is_count,
    is_int,
    is_number,
    read_mapping,
)


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, 2**70 + 0.5])
def test_is_int_refuses_bools_floats_and_strings(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1.0", None])
def test_is_number_refuses_nan_infinities_and_bools(value):
    assert not is_number(value)


def test_is_count_compares_with_the_minimum():
    assert is_count(3, 3) and not is_count(2, 3) and not is_count(True, 0)


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low": 1}, 0, r"x: expected a positive integer, got 0"),
        (
            {"low": 0, "high": 2**63 - 1},
            2**70,
            r"x: expected an integer in \[0, 9223372036854775807\]",
        ),
        ({"low": 0}, -1, r"x: expected an integer >= 0, got -1"),
        ({}, True, r"x: expected an integer, got True"),
        ({"high": 5}, 6, r"x: expected an integer <= 5, got 6"),
    ],
)
def test_check_int_names_the_field_and_the_range(kwargs, value, message):
    with pytest.raises(ValueError, match=message):
        check_int("x", value, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low": 0}, math.nan, r"t: expected a finite number >= 0, got nan"),
        ({"low": 0}, math.inf, r"t: expected a finite number >= 0, got inf"),
        ({"low": 0, "low_exclusive": True}, 0.0, r"t: expected a finite number > 0, got 0.0"),
        ({"low": 0, "high": 1}, 1.5, r"t: expected a finite number >= 0 and <= 1, got 1.5"),
        ({}, False, r"t: expected a finite number, got False"),
    ],
)
def test_check_number_refuses_nan_inf_bools_and_out_of_range(kwargs, value, message):
    with pytest.raises(ValueError, match=message):
        check_number("t", value, **kwargs)


def test_check_int_accepts_the_closed_bounds():
    check_int("x", 0, low=0, high=3)
    check_int("x", 3, low=0, high=3)


def test_check_number_accepts_the_closed_bounds():
    check_number("t", 0, low=0, high=1)
    check_number("t", 1.0, low=0, high=1)


def test_check_bool_and_check_choice():
    check_bool("flag", False)
    with pytest.raises(ValueError, match=r"flag: expected true or false, got 1"):
        check_bool("flag", 1)
    check_choice("policy", "lru", ("lru", "fifo"))
    with pytest.raises(ValueError, match=r"policy: expected one of \['fifo', 'lru'\], got 'lfu'"):
        check_choice("policy", "lfu", ("lru", "fifo"))


def test_read_mapping_reads_yaml_and_json_and_refuses_lists(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.json").write_text('{"x": 2}')
    (tmp_path / "c.json").write_text("[1, 2]")
    assert read_mapping(tmp_path / "a.yaml") == {"x": 1}
    assert read_mapping(tmp_path / "b.json") == {"x": 2}
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        read_mapping(tmp_path / "c.json")


def test_from_mapping_names_unknown_keys():
    from raycake.engine.config import CacheConfig

    assert from_mapping(CacheConfig, {"block_size": 32}, "cache").block_size == 32
    with pytest.raises(ValueError, match=r"cache: unknown field\(s\) \['blocksize'\]"):
        from_mapping(CacheConfig, {"blocksize": 32}, "cache")
