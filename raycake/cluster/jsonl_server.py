"""``raycake serve --stdin``: JSON-lines requests in, one JSON line out per request line.

Each input line is an object: ``prompt`` (a string or a list of token ids), an optional ``id``
(a string or an integer, echoed in the reply) and any ``SamplingParams`` field (``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``ignore_eos``).
Requests run concurrently; each reply carries the request's ``id`` (or its ``line`` number), so
replies may come in any order. A reply is either a result or an error
``{"error": {"code", "message"}}`` with ``code`` one of ``invalid_request`` (the line, naming the
field), ``rejected`` (the conductor's early rejection: SLOs or capacity) or ``internal`` (a fault
the cluster could not recover from). Nothing a client sends ends the server: a bad line gets its
error reply and the next line is read.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import fields
from typing import IO, Any

from raycake.cluster.cluster import Cluster, ClusterOutput
from raycake.engine.sampling_params import SamplingParams
from raycake.validation import is_int

PARAM_FIELDS = frozenset(f.name for f in fields(SamplingParams))
# Requests in flight at once; further lines wait to be read.
MAX_CONCURRENT = 64


class InvalidRequest(ValueError):
    """A line that is not a valid request; the message names the field. ``request_id`` is the
    client's id when the line got far enough to carry a valid one (the reply echoes it)."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def parse_line(raw: bytes) -> tuple[Any, Any, SamplingParams]:
    """(id, prompt, params) of one input line, or ``InvalidRequest``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"line: expected UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"line: expected a JSON object ({exc.msg})") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"line: expected a JSON object, got {type(body).__name__}")
    request_id = body.pop("id", None)
    if request_id is not None and not (isinstance(request_id, str) or is_int(request_id)):
        raise InvalidRequest(f"id: expected a string or an integer, got {request_id!r}")
    if "prompt" not in body:
        raise InvalidRequest("prompt: required (a string or a list of token ids)", request_id)
    prompt = body.pop("prompt")
    unknown = sorted(set(body) - PARAM_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"{unknown[0]}: unknown field; expected prompt, id or one of {sorted(PARAM_FIELDS)}",
            request_id,
        )
    try:
        params = SamplingParams(**body)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc), request_id) from None
    return request_id, prompt, params


def result_reply(key: dict[str, Any], out: ClusterOutput) -> dict[str, Any]:
    if out.finish_reason == "rejected":
        return error_reply(key, "rejected", out.error or "rejected")
    if out.finish_reason == "error":
        return error_reply(key, "internal", out.error or "the request failed")
    return {
        **key,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "usage": {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(out.token_ids),
            "cached_tokens": out.num_cached_tokens,
        },
        "ttft_s": out.ttft_s,
        "attempts": out.attempts,
    }


def error_reply(key: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    return {**key, "error": {"code": code, "message": message}}


class JsonLinesServer:
    """Reads request lines from ``source`` (bytes) and writes one reply line each to ``sink``."""

    def __init__(self, cluster: Cluster, source: IO[bytes], sink: IO[str]) -> None:
        self.cluster = cluster
        self.source = source
        self.sink = sink
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def _write(self, reply: dict[str, Any]) -> None:
        self.sink.write(json.dumps(reply) + "\n")
        self.sink.flush()

    async def _answer(self, line_no: int, raw: bytes) -> None:
        key: dict[str, Any] = {"line": line_no}
        try:
            try:
                request_id, prompt, params = parse_line(raw)
            except InvalidRequest as exc:
                if exc.request_id is not None:
                    key["id"] = exc.request_id
                raise
            if request_id is not None:
                key["id"] = request_id
            token_ids = self.cluster.check_request(prompt, params)
        except ValueError as exc:
            self._write(error_reply(key, "invalid_request", str(exc)))
            return
        try:
            out = await self.cluster.agenerate(token_ids, params)  # tokenized once
            reply = result_reply(key, out)
        except Exception as exc:  # a fault the cluster did not turn into an output
            reply = error_reply(key, "internal", f"{type(exc).__name__}: {exc}")
        self._write(reply)

    async def _run_one(self, line_no: int, raw: bytes) -> None:
        try:
            await self._answer(line_no, raw)
        finally:
            self._slots.release()

    async def serve(self) -> int:
        """Answer every line until end of input; returns how many lines were answered."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        answered = 0
        line_no = 0
        while True:
            raw = await loop.run_in_executor(None, self.source.readline)
            if not raw:
                break
            line_no += 1
            if not raw.strip():
                continue
            await self._slots.acquire()
            task = loop.create_task(self._run_one(line_no, raw.rstrip(b"\r\n")))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            answered += 1
        if tasks:
            await asyncio.gather(*tasks)
        return answered


def serve_stdin(cluster: Cluster) -> int:
    """Serve stdin to stdout until end of input."""
    return asyncio.run(JsonLinesServer(cluster, sys.stdin.buffer, sys.stdout).serve())
