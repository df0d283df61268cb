"""What prefill and decode instances share: an engine driven by an event loop, a KV transfer
backend, telemetry, and a cost model calibrated at start-up."""

from __future__ import annotations

from raycake.actors.calibration import calibrate
from raycake.actors.engine_loop import EngineLoop
from raycake.actors.expert_shard import enable_expert_parallelism
from raycake.actors.messages import InstanceLoad, instance_load
from raycake.cluster.config import TelemetryConfig
from raycake.engine.config import EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.policies.step_cost_model import StepCostModel
from raycake.telemetry import InstanceMetrics, Telemetry
from raycake.transfer import make_kv_transfer
from raycake.transfer.ray_direct import RayDirectKVEndpoint, transfer_options


class EngineInstance(RayDirectKVEndpoint):
    """Base of PrefillInstance and DecodeInstance (composes the Ray Direct Transport endpoint,
    which only the ray_direct backend uses)."""

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
        self.loop = EngineLoop(self.engine, on_step=self.metrics.record)
        self.transfer = make_kv_transfer(
            transfer_backend, **transfer_options(transfer_backend, self)
        )
        self.telemetry = Telemetry(telemetry or TelemetryConfig(), instance_id)
        self.cost_model = calibrate(self.engine)

    def ready(self) -> str:
        return self.instance_id

    def finished_spans(self) -> list[dict]:
        return self.telemetry.finished_spans()

    def current_cost_model(self) -> StepCostModel:
        return self.cost_model

    def load(self) -> InstanceLoad:
        return instance_load(self.instance_id, self.engine, self.current_cost_model())
