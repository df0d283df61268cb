"""A disaggregated deployment's configuration: instance counts, KV store shards, the transfer
backend, placement, restarts and retries; it composes the engine's, the conductor's scheduling
policy's, telemetry's and the HTTP server's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycake.engine.config import EngineConfig
from raycake.policies.planner import PlannerConfig
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.validation import (
    check_int,
    check_number,
    check_positive_int,
    from_mapping,
    read_mapping,
    require,
)

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
class HttpConfig:
    """The OpenAI-compatible HTTP server (``raycake serve``): a Ray Serve ingress whose replicas
    are stateless drivers over the deployment's named actors."""

    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    # Fixed replica count; None: 1, or what ``autoscaling_config`` decides.
    num_replicas: int | None = None
    # Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests...).
    autoscaling_config: dict[str, Any] | None = None
    # Requests one replica handles at once (Serve's default of 5 would queue streaming clients).
    max_ongoing_requests: int = 256
    # CPUs each replica reserves: 0 by default, since a replica mostly waits on the instances
    # and must not take the CPUs the instances were sized for.
    num_cpus: float = 0.0
    # The model id clients send; None: engine.model.
    served_model_name: str | None = None
    # Bearer key checked on every /v1 route; None: no key (the default host is loopback).
    # Never printed: the dataclass repr leaves it out.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        require(
            isinstance(self.host, str) and bool(self.host), "http.host", "a host name", self.host
        )
        check_int("http.port", self.port, low=1, high=65535)
        require(
            isinstance(self.route_prefix, str) and self.route_prefix.startswith("/"),
            "http.route_prefix",
            "a path starting with '/'",
            self.route_prefix,
        )
        if self.num_replicas is not None:
            check_positive_int("http.num_replicas", self.num_replicas)
        if self.autoscaling_config is not None:
            require(
                isinstance(self.autoscaling_config, dict),
                "http.autoscaling_config",
                "a mapping of Ray Serve autoscaling options, or null",
                self.autoscaling_config,
            )
            require(
                self.num_replicas is None,
                "http.num_replicas",
                "null when http.autoscaling_config is set (the autoscaler picks the count)",
                self.num_replicas,
            )
            _check_autoscaling_config(self.autoscaling_config)
        check_positive_int("http.max_ongoing_requests", self.max_ongoing_requests)
        check_number("http.num_cpus", self.num_cpus, low=0)
        if self.served_model_name is not None:
            require(
                isinstance(self.served_model_name, str) and bool(self.served_model_name),
                "http.served_model_name",
                "a non-empty string, or null for engine.model",
                self.served_model_name,
            )
        if self.api_key is not None:
            # The key itself is never echoed in the message.
            require(
                isinstance(self.api_key, str) and bool(self.api_key.strip()),
                "http.api_key",
                "a non-empty string, or null for no key",
                "<redacted>" if isinstance(self.api_key, str) else type(self.api_key).__name__,
            )


def _check_autoscaling_config(options: dict[str, Any]) -> None:
    """Ray Serve's own model checks the options now, not when the app is deployed."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    known = set(AutoscalingConfig.model_fields)
    unknown = sorted(set(options) - known)
    require(not unknown, "http.autoscaling_config", f"keys among {sorted(known)}", unknown)
    try:
        AutoscalingConfig(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        suffix = f".{where}" if where else ""
        raise ValueError(
            f"http.autoscaling_config{suffix}: {first['msg'].lower()}, got {first.get('input')!r}"
        ) from None


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
    http: HttpConfig = field(default_factory=HttpConfig)
    # Placement: GPUs per instance on a GPU cluster; on CPU a custom resource the autoscaler
    # can provide (e.g. {"raycake_instance": 1}). Every instance asks for instance_resources,
    # prefill instances also for prefill_resources and decode ones for decode_resources (e.g.
    # {"raycake_prefill": 1}: only the prefill worker group offers it, so the autoscaler grows
    # that group for them); KV store shards ask for store_resources only (and no CPU).
    instance_num_gpus: float = 0.0
    instance_num_cpus: float = 1.0
    instance_resources: dict[str, float] = field(default_factory=dict)
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    store_resources: dict[str, float] = field(default_factory=dict)
    # Autoscaling: the planner policy (name "fixed": the counts above never change) and how
    # often it looks at the cluster. num_prefill / num_decode are then the counts at start-up.
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    planner_interval_s: float = 5.0
    # How long a new instance may take to be placed (the autoscaler adds a node), load its
    # model and calibrate, before the scale-up is given up.
    instance_start_timeout_s: float = 600.0
    # How long a drained instance may keep requests before it is removed anyway (a caller that
    # died never releases what it booked); the requests still there end in error or are retried.
    drain_timeout_s: float = 600.0
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
            check_number(f"cluster.{name}", getattr(self, name), low=0)
        for name in ("instance", "prefill", "decode", "store"):
            _check_resources(f"cluster.{name}_resources", getattr(self, f"{name}_resources"))
        require(
            isinstance(self.planner, PlannerConfig),
            "cluster.planner",
            "a planner section (PlannerConfig)",
            self.planner,
        )
        if self.planner.name != "fixed":
            for role in ("prefill", "decode"):
                low, high = self.planner.bounds(role)
                count = getattr(self, f"num_{role}")
                require(
                    low <= count <= high,
                    f"cluster.num_{role}",
                    f"a start-up count within planner.min_{role}..max_{role} ({low}..{high})",
                    count,
                )
            require(
                self.transfer_backend != "ray_direct",
                "cluster.transfer_backend",
                "object_store or mooncake with an autoscaling planner (ray_direct joins every "
                "instance into one collective group at start-up, so it cannot add instances)",
                self.transfer_backend,
            )
        check_number(
            "cluster.planner_interval_s", self.planner_interval_s, low=0, low_exclusive=True
        )
        check_number(
            "cluster.instance_start_timeout_s",
            self.instance_start_timeout_s,
            low=0,
            low_exclusive=True,
        )
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
            "http": HttpConfig,
            "planner": PlannerConfig,
        }
        return from_mapping(cls, data, "cluster config", nested)

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterConfig:
        """Load from a ``.json`` or ``.yaml`` file."""
        return cls.from_dict(read_mapping(path))

    def role_resources(self, role: str) -> dict[str, float]:
        """Custom resources one instance of ``role`` ("prefill" or "decode") asks for."""
        return {**self.instance_resources, **getattr(self, f"{role}_resources")}


def _check_resources(name: str, resources: Any) -> None:
    """A mapping of custom resource names to amounts > 0 (Ray's own names are fields)."""
    require(isinstance(resources, dict), name, "a mapping of resource name to amount", resources)
    for key, amount in resources.items():
        require(
            isinstance(key, str) and key not in ("CPU", "GPU", "memory"),
            name,
            "custom resource names (CPU and GPU are instance_num_cpus / instance_num_gpus)",
            key,
        )
        check_number(f"{name}.{key}", amount, low=0, low_exclusive=True)
