"""Drive an LLMEngine from an asyncio actor without ever blocking the actor's event loop.

The engine lives on one dedicated thread (vLLM v1's engine-core pattern): the thread applies the
calls the event loop submits (add, abort, export, import), between steps, then steps while there
is work, and hands each step's deltas back to the loop, which routes them to per-request queues.
So the loop only admits, aborts and streams: health pings, load reports and cancellations are
answered while a step runs, and a step's expert-shard calls (``ray.get`` per MoE layer) hold the
engine thread, never the loop.

NOTE: only the engine thread touches the engine. The subscriber queues are touched only on the
event loop's thread. A step that raises (a fault the engine could not pin on one request) fails
the requests it held with the error and leaves the engine serving new requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from raycake.engine.engine_stats import StepRecord
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.request_output import StreamDelta

T = TypeVar("T")


class EngineStepError(RuntimeError):
    """The engine step that was computing this request raised; the request was aborted."""


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


class EngineLoop:
    """One engine, one thread; ``call`` runs a function on the engine between steps."""

    def __init__(
        self,
        engine: LLMEngine,
        history: int = 512,
        on_step: Callable[[LLMEngine], None] | None = None,
        name: str = "raycake-engine",
    ) -> None:
        self.engine = engine
        self.on_step = on_step  # e.g. update the instance's queue-length gauge (engine thread)
        # Recent steps, for the instance's cost model and load reports (appended on the engine
        # thread; readers copy it through ``call``).
        self.steps: deque[StepRecord] = deque(maxlen=history)
        self._queues: dict[str, asyncio.Queue[StreamDelta | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: deque[_Call] = deque()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- the event loop's side -----------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the engine thread before its next step; await it."""
        self._bind_loop()
        future: Future = Future()
        with self._wakeup:
            if self._stopped:
                raise RuntimeError("the engine loop is stopped")
            self._calls.append(_Call(lambda: fn(*args, **kwargs), future))
            self._wakeup.notify()
        return await asyncio.wrap_future(future)

    def subscribe(self, request_id: str) -> asyncio.Queue[StreamDelta | BaseException]:
        """A queue of the request's deltas. Subscribe *before* adding the request to the engine,
        so no delta can arrive before its queue exists."""
        self._bind_loop()
        queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    async def unsubscribe(self, request_id: str) -> None:
        """Stop streaming the request; abort it in the engine if it is still running there (a
        caller that went away must not leave its request computing and holding blocks)."""
        self._queues.pop(request_id, None)
        await self.call(self._abort, request_id)

    def _abort(self, request_id: str) -> None:
        if self.engine.is_unfinished(request_id):
            self.engine.abort_request(request_id)
        self.engine.discard_finished(request_id)

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        for delta in deltas:
            queue = self._queues.get(delta.request_id)
            if queue is not None:
                queue.put_nowait(delta)
                if delta.finished:
                    del self._queues[delta.request_id]

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            queue = self._queues.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(error)

    async def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while (
                    not self._stopped
                    and not self._calls
                    and not self.engine.has_unfinished_requests()
                ):
                    self._wakeup.wait()
                if self._stopped:
                    calls, self._calls = list(self._calls), deque()
                    for pending in calls:
                        pending.future.set_exception(RuntimeError("the engine loop is stopped"))
                    return
                calls, self._calls = list(self._calls), deque()
            for pending in calls:
                if pending.future.set_running_or_notify_cancel():
                    try:
                        pending.future.set_result(pending.fn())
                    except BaseException as exc:  # delivered to the awaiting coroutine
                        pending.future.set_exception(exc)
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as exc:
            # The engine isolates a request's own faults (it finishes that request with
            # "error"); what reaches here could not be pinned on one request. Abort everything
            # it held so the engine's state is whole again, and tell each waiter why.
            failed = self.engine.unfinished_request_ids()
            for request_id in failed:
                self._abort(request_id)
            error = EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
            self._post(self._fail, failed, error)
            return
        if self.engine.last_step is not None and self.engine.last_step.num_tokens:
            self.steps.append(self.engine.last_step)
        if self.on_step is not None:
            self.on_step(self.engine)
        if deltas:
            self._post(self._deliver, deltas)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)
