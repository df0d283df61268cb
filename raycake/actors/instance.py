"""What prefill and decode instances share: an engine on its own thread (``EngineLoop``), a KV
transfer backend, telemetry, and a cost model calibrated at start-up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from raycake.actors.calibration import calibrate
from raycake.actors.engine_loop import EngineLoop
from raycake.actors.expert_shard import enable_expert_parallelism
from raycake.actors.messages import InstanceLoad, instance_load
from raycake.cluster.config import TelemetryConfig
from raycake.engine.config import EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.spec.tree import SpecDecodeStats
from raycake.policies.step_cost_model import StepCostModel
from raycake.telemetry import InstanceMetrics, Telemetry
from raycake.transfer import make_kv_transfer
from raycake.transfer.ray_direct import RayDirectKVEndpoint, transfer_options

T = TypeVar("T")


class EngineInstance(RayDirectKVEndpoint):
    """Base of PrefillInstance and DecodeInstance (composes the Ray Direct Transport endpoint,
    which only the ray_direct backend uses).

    NOTE: after ``__init__`` the engine belongs to ``self.loop``'s thread: every method here
    reaches it through ``await self.loop.call(...)``, never directly.
    """

    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        transfer_backend: str = "object_store",
        telemetry: TelemetryConfig | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.engine = LLMEngine(engine_config)
        self.expert_shards = enable_expert_parallelism(self.engine)
        self.metrics = InstanceMetrics(instance_id)
        self.transfer = make_kv_transfer(
            transfer_backend, **transfer_options(transfer_backend, self)
        )
        # NOTE: a KVTransfer is not thread-safe (mooncake's engine allocates from one buffer):
        # its calls run off the event loop, one at a time, under this lock.
        self._transfer_lock = threading.Lock()
        self.telemetry = Telemetry(telemetry or TelemetryConfig(), instance_id)
        self.cost_model = calibrate(self.engine)  # before the engine thread starts
        self.loop = EngineLoop(self.engine, on_step=self.metrics.record, name=instance_id)

    async def in_transfer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a call on ``self.transfer``) on a worker thread, one at a time."""

        def locked() -> T:
            with self._transfer_lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    def ready(self) -> str:
        """A health ping: answered at once, even while a step runs."""
        return self.instance_id

    def finished_spans(self) -> list[dict]:
        return self.telemetry.finished_spans()

    def current_cost_model(self) -> StepCostModel:
        """The cost model the conductor plans with (engine thread)."""
        return self.cost_model

    async def load(self) -> InstanceLoad:
        return await self.loop.call(
            lambda: instance_load(self.instance_id, self.engine, self.current_cost_model())
        )

    async def free_kv_blocks(self) -> int:
        """Blocks free for new requests (tests count them after cancellations and faults)."""
        return await self.loop.call(lambda: self.engine.scheduler.kv_cache.num_free_blocks)

    async def num_unfinished(self) -> int:
        return await self.loop.call(lambda: len(self.engine.unfinished_request_ids()))

    async def is_idle(self) -> bool:
        """No request left in the engine: a drained instance may be removed."""
        return await self.num_unfinished() == 0

    async def spec_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding totals since start (None without speculation)."""
        return await self.loop.call(self.engine.spec_stats)

    async def cached_block_hashes(self) -> list[bytes]:
        """The prompt blocks this instance's prefix cache holds (a restarted conductor's index)."""
        return await self.loop.call(self.engine.scheduler.kv_cache.cached_block_hashes)
