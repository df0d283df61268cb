"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause or meet has one status: 400 for a request that is invalid
(the message and ``param`` name the field), 401 without a valid key, 404 for a model this server
does not serve, 429 with ``Retry-After`` when the conductor rejects a request for its SLOs or
capacity, 500 only for a fault inside the cluster, 503 when the cluster cannot be reached. Once a
stream has started, its status is sent: a failure then is an ``error`` event in the stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

# Seconds a client should wait after a rejection: the conductor's view (queues, free blocks)
# changes within about one prefill, so a second is ample and does not stall clients.
RETRY_AFTER_S = 1

# "field: expected ..." (raycake.validation's messages): the field is what ``param`` names.
_FIELD = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\][\w.]*)*): ")
# A pydantic union member's tag in an error location ("str", "list[int]", "TextPart").
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
# What each union-typed field accepts, for messages about them.
UNION_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}


class ApiError(Exception):
    """An HTTP error with its OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse(self) -> str:
        """The error as a Server-Sent Event, for a stream that has already started."""
        return f"data: {json.dumps(self.body())}\n\n"


def field_of(message: str) -> str | None:
    """The field a raycake ``ValueError`` message names (``"top_k: expected ..."``)."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


def invalid_request(exc: ValueError | str, code: str | None = "invalid_value") -> ApiError:
    """400 for a raycake ``ValueError``; ``param`` is the field its message names."""
    message = str(exc)
    return ApiError(400, message, param=field_of(message), code=code)


def context_length_exceeded(message: str) -> ApiError:
    """400, as vLLM and OpenAI answer a prompt (+ max_tokens) beyond the model's context."""
    return ApiError(400, message, param=field_of(message), code="context_length_exceeded")


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"model: {model!r} is not served here; this server serves {served!r} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def rejected(reason: str) -> ApiError:
    """429: the conductor predicted that no instance pair meets the request's SLOs (or has room)."""
    return ApiError(
        429,
        f"rejected by the conductor, retry later: {reason}",
        type="rate_limit_error",
        code="rejected",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal(reason: str) -> ApiError:
    """500: a fault in the cluster the request could not recover from."""
    return ApiError(500, f"the request failed: {reason}", type="server_error", code="internal")


def unavailable(reason: str) -> ApiError:
    return ApiError(503, reason, type="server_error", code="unavailable")


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> ApiError:
    """400 for pydantic's (or FastAPI's) errors: the first invalid field, what it expects."""
    if not errors:
        return ApiError(400, "body: invalid request", param=None, code="invalid_value")
    first = errors[0]
    loc = _field_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first.get("msg", "")
        return ApiError(
            400, f"body: expected a JSON object ({detail})", param=None, code="invalid_json"
        )
    if not loc:
        got = type(first.get("input")).__name__
        return ApiError(
            400, f"body: expected a JSON object, got {got}", param=None, code="invalid_value"
        )
    param = _param(loc)
    # A union's members each report an error at the same field: describe the union once.
    same_field = [e for e in errors if _field_path(e.get("loc", ())) == loc]
    kind = first.get("type")
    if kind == "missing":
        message = f"{param}: required"
    elif kind == "extra_forbidden":
        message = f"{param}: unknown field"
    elif len(same_field) > 1 and isinstance(loc[-1], str) and loc[-1] in UNION_EXPECTED:
        message = f"{param}: expected {UNION_EXPECTED[loc[-1]]}, got {first.get('input')!r:.200}"
    else:
        message = (
            f"{param}: {_expected(first.get('msg', 'invalid'))}, got {first.get('input')!r:.200}"
        )
    return ApiError(400, message, param=param, code="invalid_value")


def _expected(msg: str) -> str:
    """pydantic's "Input should be a valid integer" as raycake says it: "expected a valid
    integer"."""
    for lead in ("Input should be ", "Value error, "):
        if msg.startswith(lead):
            return "expected " + msg[len(lead) :] if lead.startswith("Input") else msg[len(lead) :]
    return msg[:1].lower() + msg[1:]


def _field_path(loc: Sequence[Any]) -> tuple[Any, ...]:
    """The location up to the first union-member tag, without FastAPI's leading "body"."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    path: list[Any] = []
    for part in parts:
        if isinstance(part, str) and (not _FIELD_NAME.match(part) or part in _TYPE_NAMES):
            break
        path.append(part)
    return tuple(path)


def _param(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
