"""The OpenAI API's logic over a ``Cluster``, without HTTP: a request is planned and checked
before any work, its choices run concurrently (one cluster request each), and the result is one
JSON body or a stream of Server-Sent Events.

Cancellation: every choice runs in an asyncio task of its own, iterating ``Cluster.astream``
inside ``contextlib.aclosing``. Cancelling the task closes the stream, which cancels the request
in the prefill and decode instances (they free its blocks). Tasks are cancelled synchronously
from the response's ``close`` however the response ends, so a client that goes away mid-stream
(whose handler Ray Serve cancels, possibly while the SSE generator is suspended at a ``yield``)
frees what its request holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayError

from raycake.cluster.cluster import Cluster
from raycake.cluster.config import HttpConfig
from raycake.cluster.openai_errors import (
    ApiError,
    context_length_exceeded,
    internal,
    invalid_request,
    model_not_found,
    rejected,
    unavailable,
)
from raycake.cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ContextLengthError,
    Plan,
    ResponseMeta,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    plan_chat,
    plan_completion,
    usage,
    usage_chunk,
)

# How long /health waits for an instance's ready() (a restarting instance does not answer).
HEALTH_TIMEOUT_S = 2.0
DONE_EVENT = "data: [DONE]\n\n"
# Choice tasks being cancelled still run their cleanup (actor cancels, conductor book-keeping):
# the event loop holds tasks only weakly, so they are kept here until they end.
_LIVE_TASKS: set[asyncio.Task] = set()


@dataclass(frozen=True)
class ChoiceEvent:
    """A choice's progress: text new since its previous event, and how it ended."""

    index: int
    text: str
    finish_reason: str | None  # "stop", "length", "rejected", "error" or None (not yet)
    error: str | None
    completion_tokens: int
    cached_tokens: int

    @property
    def failed(self) -> bool:
        return self.finish_reason in ("rejected", "error")

    def api_error(self) -> ApiError:
        if self.finish_reason == "rejected":
            return rejected(self.error or "no reason given")
        return internal(self.error or "no reason given")


class ChoiceRunner:
    """Runs a plan's choices concurrently and merges their progress into one queue of events."""

    def __init__(self, cluster: Cluster, plan: Plan) -> None:
        self._cluster = cluster
        self._plan = plan
        self._queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(choice.index)) for choice in plan.choices]
        for task in self._tasks:
            _LIVE_TASKS.add(task)
            task.add_done_callback(_LIVE_TASKS.discard)

    async def next(self) -> ChoiceEvent:
        return await self._queue.get()

    def ready(self) -> ChoiceEvent | None:
        """The next event if one is already waiting, else None."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def cancel(self) -> None:
        """Cancel every choice still running (synchronous: safe from any cleanup path)."""
        for task in self._tasks:
            task.cancel()

    async def _run(self, index: int) -> None:
        choice = self._plan.choices[index]
        stream = self._cluster.astream(
            choice.prompt_token_ids,
            choice.params,
            ttft_slo_s=self._plan.ttft_slo_s,
            tbt_slo_s=self._plan.tbt_slo_s,
        )
        sent = 0  # characters of text already in an event
        first = True
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    # A retried request rebuilds its text from scratch (replay is checked to
                    # match what was delivered): only text beyond what was sent is new.
                    new = out.text[sent:]
                    sent = max(sent, len(out.text))
                    if new or first or out.finish_reason is not None:
                        first = False
                        self._queue.put_nowait(
                            ChoiceEvent(
                                index,
                                new,
                                out.finish_reason,
                                out.error,
                                len(out.token_ids),
                                out.num_cached_tokens,
                            )
                        )
        except Exception as exc:  # a fault the cluster did not turn into an output
            self._queue.put_nowait(
                ChoiceEvent(index, "", "error", f"{type(exc).__name__}: {exc}", 0, 0)
            )


@dataclass
class EventStream:
    """A started stream: its SSE lines, and ``close`` to call however the response ends."""

    events: AsyncIterator[str]
    close: Callable[[], None]


class OpenAIService:
    """``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` and health over a Cluster."""

    def __init__(self, cluster: Cluster, http: HttpConfig) -> None:
        self.cluster = cluster
        self.model_id = http.served_model_name or cluster.config.engine.model

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "raycake",
                    "root": self.cluster.config.engine.model,
                    "max_model_len": self.cluster.limits.max_model_len,
                }
            ],
        }

    async def completion(self, req: CompletionRequest) -> dict[str, Any] | EventStream:
        plan = self._plan(req, plan_completion)
        return await self._respond(req.stream, plan, ResponseMeta.new("cmpl", self.model_id), False)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | EventStream:
        plan = self._plan(req, plan_chat)
        meta = ResponseMeta.new("chatcmpl", self.model_id)
        return await self._respond(req.stream, plan, meta, True)

    async def health(self) -> dict[str, Any]:
        """Which instances answer; ``ApiError`` 503 unless a prefill and a decode instance do."""
        groups = {"prefill": self.cluster.prefill, "decode": self.cluster.decode}
        status = {
            kind: dict(
                zip(actors, await asyncio.gather(*map(_answers, actors.values())), strict=True)
            )
            for kind, actors in groups.items()
        }
        if not all(any(answers.values()) for answers in status.values()):
            down = [iid for answers in status.values() for iid, ok in answers.items() if not ok]
            raise unavailable(
                f"no prefill or no decode instance answers within {HEALTH_TIMEOUT_S:g} s "
                f"(not answering: {', '.join(down)})"
            )
        return {"status": "ok", **status}

    def _plan(self, req: Any, planner: Callable[..., Plan]) -> Plan:
        if req.model != self.model_id:
            raise model_not_found(req.model, self.model_id)
        try:
            plan = planner(req, self.cluster.tokenizer, self.cluster.limits)
        except ContextLengthError as exc:
            raise context_length_exceeded(str(exc)) from None
        except ValueError as exc:
            raise invalid_request(exc) from None
        # Every request of every choice is checked before any is sent.
        for choice in plan.choices:
            try:
                self.cluster.check_request(choice.prompt_token_ids, choice.params)
            except ValueError as exc:
                raise invalid_request(exc) from None
        return plan

    async def _respond(
        self, stream: bool, plan: Plan, meta: ResponseMeta, chat: bool
    ) -> dict[str, Any] | EventStream:
        runner = ChoiceRunner(self.cluster, plan)
        try:
            if not stream:
                return await _collect(runner, plan, meta, chat)
            # The status is sent with the first chunk: a rejection before any token is a 429.
            first = await runner.next()
            if first.failed:
                raise first.api_error()
        except BaseException:
            runner.cancel()
            raise
        return EventStream(_sse(first, runner, plan, meta, chat), runner.cancel)


async def _answers(actor: Any) -> bool:
    async def ready() -> Any:
        return await actor.ready.remote()

    try:
        await asyncio.wait_for(ready(), HEALTH_TIMEOUT_S)
    except (asyncio.TimeoutError, RayError):
        return False
    return True


class _Tally:
    """Per-choice text, finish reasons and token counts; the response's usage."""

    def __init__(self, plan: Plan) -> None:
        n = len(plan.choices)
        self.plan = plan
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.completion_tokens = [0] * n
        self.cached_tokens = [0] * n
        self.finished = 0

    def add(self, event: ChoiceEvent) -> None:
        self.texts[event.index] += event.text
        if event.finish_reason is not None:
            self.reasons[event.index] = event.finish_reason
            self.completion_tokens[event.index] = event.completion_tokens
            self.cached_tokens[event.index] = event.cached_tokens
            self.finished += 1

    @property
    def done(self) -> bool:
        return self.finished == len(self.texts)

    def usage(self) -> dict[str, Any]:
        # A prompt counts once however many choices it has (as OpenAI bills it), with the cache
        # hits of its first choice.
        first_choice = {}
        for choice in self.plan.choices:
            first_choice.setdefault(choice.prompt_index, choice.index)
        return usage(
            sum(len(ids) for ids in self.plan.prompt_token_ids),
            sum(self.completion_tokens),
            sum(self.cached_tokens[i] for i in first_choice.values()),
        )


async def _collect(runner: ChoiceRunner, plan: Plan, meta: ResponseMeta, chat: bool) -> dict:
    tally = _Tally(plan)
    try:
        while not tally.done:
            event = await runner.next()
            if event.failed:
                raise event.api_error()
            tally.add(event)
    finally:
        runner.cancel()  # the others, when one choice failed
    build = chat_response if chat else completion_response
    return build(meta, tally.texts, [r or "stop" for r in tally.reasons], tally.usage())


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _SSEWriter:
    """Turns a request's events into Server-Sent Events, in OpenAI's chunk shapes."""

    def __init__(self, plan: Plan, meta: ResponseMeta, chat: bool) -> None:
        self.tally = _Tally(plan)
        self.meta = meta
        self.chat = chat
        self.with_usage = plan.include_usage
        self.started: set[int] = set()

    def add(self, event: ChoiceEvent, out: list[str]) -> bool:
        """Append the event's lines to ``out``; True once the stream is over."""
        if event.failed:
            out.append(event.api_error().sse())
            return True
        self.tally.add(event)
        meta, i, reason, with_usage = self.meta, event.index, event.finish_reason, self.with_usage
        if self.chat:
            if i not in self.started:
                self.started.add(i)
                role = {"role": "assistant", "content": ""}
                out.append(_data(chat_chunk(meta, i, role, None, with_usage)))
            if event.text:
                out.append(_data(chat_chunk(meta, i, {"content": event.text}, None, with_usage)))
            if reason is not None:
                out.append(_data(chat_chunk(meta, i, {}, reason, with_usage)))
        elif event.text or reason is not None:
            out.append(_data(completion_chunk(meta, i, event.text, reason, with_usage)))
        if not self.tally.done:
            return False
        if with_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            out.append(_data(usage_chunk(meta, obj, self.tally.usage())))
        return True


async def _sse(
    first: ChoiceEvent, runner: ChoiceRunner, plan: Plan, meta: ResponseMeta, chat: bool
) -> AsyncIterator[str]:
    writer = _SSEWriter(plan, meta, chat)
    out: list[str] = []
    event = first
    try:
        while not writer.add(event, out):
            # Events already waiting go out in one write: under load, fewer messages from the
            # replica through Serve's proxy to the client, for the same events.
            ready = runner.ready()
            if ready is not None:
                event = ready
                continue
            yield "".join(out)
            out.clear()
            event = await runner.next()
        out.append(DONE_EVENT)
        yield "".join(out)
    finally:
        runner.cancel()
