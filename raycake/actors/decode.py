"""DecodeInstance: continuous batching over requests whose KV arrived from prefill instances.

A plain class with async methods; ``cluster/`` makes it a Ray actor (an async actor, so on
uvloop when installed). ``generate`` is an async generator: Ray streams its deltas to the caller.
The engine steps on its own thread (``EngineLoop``); this class only fetches KV, admits, streams
and aborts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from raycake.actors.calibration import samples_from_steps
from raycake.actors.instance import EngineInstance
from raycake.actors.messages import DecodeWork
from raycake.engine.request_output import StreamDelta
from raycake.policies.step_cost_model import StepCostModel
from raycake.transfer.wire import UnpackedKV

# How long an arrived request that can fit waits for KV blocks to free up before it fails.
ADMISSION_TIMEOUT_S = 60.0


class DecodeInstance(EngineInstance):
    def current_cost_model(self) -> StepCostModel:
        """The start-up fit with its decode half refitted to recent steps when they cover
        enough shapes (engine thread). The conductor then predicts this instance's TBT from
        how fast it runs now: one that calibrated on a busy node and looks slow forever would
        get no request, and one whose node got busy would keep getting too many."""
        _, decode = samples_from_steps(self.loop.steps)
        try:
            return self.cost_model.refit_decode(decode)
        except ValueError:
            return self.cost_model

    async def generate(self, work: DecodeWork) -> AsyncIterator[StreamDelta]:
        """Fetch the prompt's KV, join the running batch, stream deltas until finished."""
        with self.telemetry.span("transfer", work.trace_context, instance=self.instance_id):
            fetched = await self.in_transfer_thread(self.transfer.fetch, work.kv_handle)
        # The blocks are registered in this instance's prefix cache under the prompt's hashes:
        # they must be the hashes the prefill instance sent (checked before any waiting).
        block_hashes = list(work.kv_handle.kv_header().block_hashes)
        await self.loop.call(
            self.engine.check_prompt_block_hashes, work.prompt_token_ids, block_hashes
        )
        queue = self.loop.subscribe(work.request_id)
        try:
            await self._admit(work, fetched)
            with self.telemetry.span("decode", work.trace_context, instance=self.instance_id):
                while True:
                    delta = await queue.get()
                    if isinstance(delta, BaseException):
                        raise delta
                    yield delta
                    if delta.finished:
                        return
        finally:
            # Finished, failed, or the caller went away (Ray closes the generator): the
            # request must not stay in the engine holding blocks.
            await asyncio.shield(self.loop.unsubscribe(work.request_id))

    async def _admit(self, work: DecodeWork, fetched: UnpackedKV) -> None:
        """Add the request once its blocks fit; the conductor reserved them, so waits are short.
        A request that can never fit (beyond max_model_len or the whole pool) raises at once.
        The block hashes were checked once, before: a retry does not hash the prompt again."""
        deadline = asyncio.get_running_loop().time() + ADMISSION_TIMEOUT_S
        while not await self.loop.call(
            self.engine.add_prefilled_request,
            work.request_id,
            work.prompt_token_ids,
            work.first_token_id,
            work.sampling_params,
            fetched.kv,
            features=fetched.features,
            # Titans: the memory state after the prompt (checked by the engine; None otherwise).
            memory_state=fetched.memory_state,
        ):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"request {work.request_id!r}: no KV blocks free on {self.instance_id} "
                    f"within {ADMISSION_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.005)  # back-pressure: running requests free blocks as they end
