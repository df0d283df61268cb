"""A disaggregated deployment's configuration: instance counts, KV store shards, the transfer
backend, placement, restarts and retries; it composes the engine's, the conductor's scheduling
policy's and telemetry's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycake.engine.config import EngineConfig
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.validation import check_positive_int, from_mapping, read_mapping, require

TRANSFER_BACKENDS = ("mooncake", "object_store", "ray_direct")
TELEMETRY_EXPORTERS = ("none", "console", "memory", "otlp")


@dataclass(frozen=True)
class TelemetryConfig:
    """Where request spans go: "none", "console", "memory" (tests), or "otlp"."""

    exporter: str = "none"
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces
    service_name: str = "raycake"

    def __post_init__(self) -> None:
        require(
            self.exporter in TELEMETRY_EXPORTERS,
            "telemetry.exporter",
            f"one of {list(TELEMETRY_EXPORTERS)}",
            self.exporter,
        )


@dataclass(frozen=True)
class ClusterConfig:
    """A disaggregated deployment: prefill and decode instances, KV store shards, a conductor."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    num_prefill: int = 1
    num_decode: int = 1
    num_store_shards: int = 2
    store_capacity_bytes: int = 256 * 1024 * 1024  # per shard
    # Copy a block to the next shard once it has been read this often (None: no replicas).
    store_replicate_after_reads: int | None = None
    transfer_backend: str = "object_store"
    # Store -> instance bandwidth the conductor plans with (bytes/s).
    transfer_bandwidth_bytes_per_s: float = 2e9
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # Placement: GPUs per instance on a GPU cluster; on CPU a custom resource the autoscaler
    # can provide (e.g. {"raycake_instance": 1}).
    instance_num_gpus: float = 0.0
    instance_num_cpus: float = 1.0
    instance_resources: dict[str, float] = field(default_factory=dict)
    # None: join the running Ray cluster if there is one, else start a local one.
    ray_address: str | None = None
    namespace: str = "raycake"
    actor_max_restarts: int = 2
    # A request whose decode or prefill instance dies is retried this many times.
    request_max_retries: int = 2

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode"):
            check_positive_int(f"cluster.{name}", getattr(self, name))
        require(
            isinstance(self.num_store_shards, int) and self.num_store_shards >= 0,
            "cluster.num_store_shards",
            "an integer >= 0 (0: no KV store)",
            self.num_store_shards,
        )
        check_positive_int("cluster.store_capacity_bytes", self.store_capacity_bytes)
        if self.store_replicate_after_reads is not None:
            check_positive_int(
                "cluster.store_replicate_after_reads", self.store_replicate_after_reads
            )
        require(
            self.transfer_backend in TRANSFER_BACKENDS,
            "cluster.transfer_backend",
            f"one of {list(TRANSFER_BACKENDS)}",
            self.transfer_backend,
        )
        require(
            self.transfer_bandwidth_bytes_per_s > 0,
            "cluster.transfer_bandwidth_bytes_per_s",
            "> 0",
            self.transfer_bandwidth_bytes_per_s,
        )
        for name in ("instance_num_gpus", "instance_num_cpus"):
            require(getattr(self, name) >= 0, f"cluster.{name}", ">= 0", getattr(self, name))
        for name in ("actor_max_restarts", "request_max_retries"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value >= 0, f"cluster.{name}", "an integer >= 0", value
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """Build from parsed YAML/JSON; nested sections are dicts; unknown keys are an error."""
        nested = {
            "engine": EngineConfig,
            "scheduling": SchedulingConfig,
            "telemetry": TelemetryConfig,
        }
        return from_mapping(cls, data, "cluster config", nested)

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterConfig:
        """Load from a ``.json`` or ``.yaml`` file."""
        return cls.from_dict(read_mapping(path))
