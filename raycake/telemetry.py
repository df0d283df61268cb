"""OpenTelemetry spans that follow a request across actors, and Ray metrics for the dashboard.

Spans: each stage (conductor, prefill, transfer, decode) opens a span whose parent comes from a
W3C trace-context dict carried in the actor messages, so one request is one trace. Exporter by
config: "none", "console", "memory" (kept in the process, for tests and ``finished_spans``) or
"otlp" (needs the opentelemetry-exporter-otlp package).

Metrics: ``ray.util.metrics`` series, exported by Ray to Prometheus as ``ray_raycake_*``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from raycake.cluster.config import TelemetryConfig
from raycake.engine.engine_stats import moe_load_since

if TYPE_CHECKING:
    from raycake.engine.spec.tree import SpecDecodeStats
    from raycake.model.moe import MoEStats

_PROPAGATOR = TraceContextTextMapPropagator()


class Telemetry:
    """One per process (driver or actor): a tracer under its own provider, no global state."""

    def __init__(self, config: TelemetryConfig, component: str) -> None:
        self.config = config
        self._memory: InMemorySpanExporter | None = None
        self._tracer = None
        if config.exporter == "none":
            return
        from opentelemetry.sdk.resources import Resource

        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "raycake.component": component}
            )
        )
        if config.exporter == "console":
            exporter: Any = ConsoleSpanExporter()
        elif config.exporter == "memory":
            exporter = self._memory = InMemorySpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise ValueError(
                    "telemetry.exporter: 'otlp' needs `pip install opentelemetry-exporter-otlp`"
                ) from exc
            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = provider.get_tracer("raycake")

    @contextlib.contextmanager
    def span(
        self, name: str, parent: dict[str, str] | None = None, **attributes: Any
    ) -> Iterator[dict[str, str]]:
        """Open a span under ``parent`` (a trace-context dict); yields this span's context dict."""
        if self._tracer is None:
            yield dict(parent or {})
            return
        context = _PROPAGATOR.extract(parent or {})
        with self._tracer.start_as_current_span(
            name, context=context, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(
                carrier, set_span_in_context(NonRecordingSpan(span.get_span_context()))
            )
            yield carrier

    def finished_spans(self) -> list[dict[str, Any]]:
        """Spans recorded by the "memory" exporter, as plain dicts."""
        if self._memory is None:
            return []
        return [
            {
                "name": s.name,
                "trace_id": format(s.context.trace_id, "032x"),
                "span_id": format(s.context.span_id, "016x"),
                "parent_id": None if s.parent is None else format(s.parent.span_id, "016x"),
                "attributes": dict(s.attributes or {}),
            }
            for s in self._memory.get_finished_spans()
        ]


class ClusterMetrics:
    """``ray.util.metrics`` series (exported as ``ray_raycake_*`` to Prometheus / the dashboard)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        ms = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
        self.ttft_ms = Histogram("raycake_ttft_ms", "Time to first token", boundaries=ms)
        self.tbt_ms = Histogram("raycake_tbt_ms", "Time between tokens", boundaries=ms[:8])
        self.prompt_tokens = Counter("raycake_prompt_tokens", "Prompt tokens served")
        self.cached_tokens = Counter("raycake_cached_prompt_tokens", "Prompt tokens from caches")
        self.kv_bytes = Counter("raycake_kv_bytes_transferred", "KV bytes prefill -> decode")
        self.rejections = Counter(
            "raycake_rejections", "Requests rejected early", tag_keys=("reason",)
        )


class InstanceMetrics:
    """Per-instance gauges, labelled with the instance id (a no-op outside a Ray worker).

    ``record(engine)`` runs after every engine step. Queue length and KV usage are the current
    values. The MoE gauges (expert load per layer, drop rate, imbalance) and the speculation
    gauges (acceptance length, draft time share, estimated speedup) show a recent window rather
    than one noisy step or the whole life of the instance: each publication is what was added
    since the previous one (over the engine's cumulative counts), published at most every
    ``window_s`` seconds (the first step at once). An idle instance keeps its last window's
    values. The speculation policy's choice (``raycake_spec_policy``, one series per field of
    ``SpeculationController.metrics``) is the last step's.
    """

    def __init__(self, instance_id: str, window_s: float = 5.0) -> None:
        import ray

        self._tags = {"instance": instance_id}
        self.window_s = window_s
        self._moe_baseline: dict[int, MoEStats] = {}
        self._spec_baseline: SpecDecodeStats | None = None
        self._published_at: float | None = None
        self._enabled = ray.is_initialized()
        if not self._enabled:
            return
        from ray.util.metrics import Gauge

        self._queue = Gauge(
            "raycake_queue_length", "Requests waiting or running", tag_keys=("instance",)
        )
        self._kv_usage = Gauge(
            "raycake_kv_cache_usage", "Fraction of KV blocks in use", tag_keys=("instance",)
        )
        self._expert_tokens = Gauge(
            "raycake_moe_expert_tokens",
            "(token, choice) pairs each expert ran in the last window",
            tag_keys=("instance", "layer", "expert"),
        )
        self._drop_rate = Gauge(
            "raycake_moe_drop_rate",
            "Fraction of (token, choice) pairs dropped at expert capacity in the last window",
            tag_keys=("instance", "layer"),
        )
        self._imbalance = Gauge(
            "raycake_moe_imbalance",
            "Busiest expert's demand (router choices, before capacity drops) over the mean, "
            "last window (1 is balanced)",
            tag_keys=("instance", "layer"),
        )
        self._acceptance_length = Gauge(
            "raycake_spec_acceptance_length",
            "Tokens emitted per target pass of speculating requests, last window",
            tag_keys=("instance",),
        )
        self._acceptance_rate = Gauge(
            "raycake_spec_acceptance_rate",
            "Accepted draft tokens over verified draft tokens, last window",
            tag_keys=("instance",),
        )
        self._draft_share = Gauge(
            "raycake_spec_draft_time_share",
            "Share of step time spent in the draft head, last window",
            tag_keys=("instance",),
        )
        self._speedup = Gauge(
            "raycake_spec_estimated_speedup",
            "Tokens/s of speculating steps over plain decoding's (plain steps timed by the "
            "fitted cost model), last window",
            tag_keys=("instance",),
        )
        self._policy = Gauge(
            "raycake_spec_policy",
            "The speculation policy's choice in the last step (batch size, requests "
            "speculating, draft tokens, predicted speedup, step counts)",
            tag_keys=("instance", "field"),
        )

    def record(self, engine: Any) -> None:
        if not self._enabled:
            return
        stats = engine.stats()
        self._queue.set(stats.num_running + stats.num_waiting, tags=self._tags)
        self._kv_usage.set(stats.kv_cache_usage, tags=self._tags)
        controller = getattr(engine, "spec_controller", None)
        if controller is not None:
            for name, value in controller.metrics().items():
                self._policy.set(value, tags={**self._tags, "field": name})
        now = time.monotonic()
        if self._published_at is None or now - self._published_at >= self.window_s:
            self._published_at = now
            self._record_moe(engine.moe_stats())
            spec = engine.spec_stats()
            if spec is not None:
                self._record_spec(spec)

    def _record_moe(self, current: dict[int, MoEStats]) -> None:
        window = moe_load_since(current, self._moe_baseline)
        self._moe_baseline = current
        for layer, load in window.items():
            tags = {**self._tags, "layer": str(layer)}
            for expert, tokens in enumerate(load.tokens_per_expert):
                self._expert_tokens.set(tokens, tags={**tags, "expert": str(expert)})
            self._drop_rate.set(load.drop_rate, tags=tags)
            self._imbalance.set(load.imbalance, tags=tags)

    def _record_spec(self, current: SpecDecodeStats) -> None:
        window = current if self._spec_baseline is None else current.since(self._spec_baseline)
        self._spec_baseline = current
        if window.draft_seconds + window.target_seconds > 0:
            self._draft_share.set(window.draft_time_share, tags=self._tags)
        if window.num_verify_steps:  # nothing was verified: keep the last window's values
            self._acceptance_length.set(window.mean_acceptance_length, tags=self._tags)
            self._acceptance_rate.set(window.acceptance_rate, tags=self._tags)
            self._speedup.set(window.estimated_speedup, tags=self._tags)
