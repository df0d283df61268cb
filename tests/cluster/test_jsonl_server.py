"""``raycake serve --stdin``: every line gets one reply line, errors carry a code and name the
field, the client's id is echoed, and no line ends the server."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from raycake.cluster.jsonl_server import InvalidRequest, JsonLinesServer, parse_line


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"\xff\xfe not utf-8", "line: expected UTF-8"),
        (b"{not json", "line: expected a JSON object"),
        (b'"a bare string"', "line: expected a JSON object, got str"),
        (b"[1, 2]", "got list"),
        (b'{"max_tokens": 4}', "prompt: required"),
        (b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "x", "id": {"a": 1}}', "id: expected a string or an integer"),
        (b'{"prompt": "x", "top_n": 3}', "top_n: unknown field"),
    ],
)
def test_bad_lines_are_refused_naming_the_field(raw, field):
    with pytest.raises(InvalidRequest, match=field):
        parse_line(raw)


def test_a_good_line_parses_into_params():
    request_id, prompt, params = parse_line(b'{"id": "r1", "prompt": [1, 2], "max_tokens": 3}')
    assert (request_id, prompt, params.max_tokens) == ("r1", [1, 2], 3)


def test_every_line_is_answered_and_the_server_survives_bad_ones(serving_cluster):
    lines = [
        {"id": "ok-1", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0},
        "garbage that is not json",
        {"id": 7, "prompt": 12345},
        {"id": "long", "prompt": [5] * 2040, "max_tokens": 16},
        {"id": "oov", "prompt": [1, 2, 10**6]},
        {"id": "bool", "prompt": "x", "max_tokens": True},
        {"prompt": None},
        {"id": "ok-2", "prompt": "import os", "max_tokens": 4, "temperature": 0},
    ]
    raw = b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )
    raw += b"\xff\xfe\n"  # invalid UTF-8
    sink = io.StringIO()
    answered = asyncio.run(JsonLinesServer(serving_cluster, io.BytesIO(raw), sink).serve())
    replies = [json.loads(r) for r in sink.getvalue().splitlines()]
    assert answered == len(replies) == len(lines) + 1
    by_key = {r.get("id", f"line-{r['line']}"): r for r in replies}
    for key in ("ok-1", "ok-2"):
        assert by_key[key]["finish_reason"] == "length"
        assert (
            by_key[key]["usage"]["completion_tokens"]
            == lines[0 if key == "ok-1" else 7]["max_tokens"]
        )
    expected_errors = {
        "line-2": "line: expected a JSON object",
        7: "prompt: expected a string or a list of token ids",
        "long": "max_tokens: expected prompt (2040 tokens) + max_tokens <= max_model_len",
        "oov": "prompt: expected integer token ids in [0, 4096), got 1000000 at index 2",
        "bool": "max_tokens",
        "line-7": "prompt",
        "line-9": "line: expected UTF-8",
    }
    for key, message in expected_errors.items():
        error = by_key[key]["error"]
        assert error["code"] == "invalid_request", (key, error)
        assert error["message"].startswith(message) or message in error["message"], (key, error)
