"""Drive an LLMEngine from an asyncio actor: step while there is work, hand deltas to waiters.

NOTE: every engine call happens on the event loop's thread, so requests arriving between
steps never race with a step in progress. A step blocks the loop for its duration (ms).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from raycake.engine.llm_engine import LLMEngine, StepRecord
from raycake.engine.request_output import StreamDelta


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        history: int = 512,
        on_step: Callable[[LLMEngine], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_step = on_step  # e.g. update the instance's queue-length gauge
        self._queues: dict[str, asyncio.Queue[StreamDelta]] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # Recent steps, for the instance's cost model and load reports.
        self.steps: deque[StepRecord] = deque(maxlen=history)

    def subscribe(self, request_id: str) -> asyncio.Queue[StreamDelta]:
        """A queue of the request's deltas; call right after adding it to the engine."""
        queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_running()
        assert self._wakeup is not None
        self._wakeup.set()
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        if self.engine.is_unfinished(request_id):
            self.engine.abort_request(request_id)
            self.engine.pop_finished(request_id)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                deltas = self.engine.step()
            except Exception as exc:  # a broken step fails every waiter rather than hanging them
                for queue in self._queues.values():
                    queue.put_nowait(exc)  # type: ignore[arg-type]
                self._queues.clear()
                raise
            if self.engine.last_step is not None and self.engine.last_step.num_tokens:
                self.steps.append(self.engine.last_step)
            if self.on_step is not None:
                self.on_step(self.engine)
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                    if delta.finished:
                        del self._queues[delta.request_id]
            await asyncio.sleep(0)  # let new requests and readers in between steps

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
