"""ClusterConfig -> named Ray actors, and the driver-side path of every request.

A request: hash the prompt into blocks -> Conductor.schedule (or early rejection) ->
PrefillInstance.prefill (store prefix fetched, KV published) -> DecodeInstance.generate
(streamed) -> Conductor.request_done. An instance that dies mid-request makes the request
retry from the conductor, up to ``request_max_retries`` times, then fail with the error.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from raycake.actors.conductor import Conductor
from raycake.actors.decode import DecodeInstance
from raycake.actors.kv_store import KVStoreShard, replica_shard
from raycake.actors.messages import DecodeWork, PrefillResult, PrefillWork
from raycake.actors.prefill import PrefillInstance
from raycake.cluster.config import ClusterConfig
from raycake.engine.kv_cache import block_hashes_for
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.engine.sampling_params import SamplingParams
from raycake.model.loader import DTYPES, read_model_config, resolve_model_path
from raycake.model.tokenizer import Tokenizer
from raycake.policies.scheduling import Rejection
from raycake.telemetry import ClusterMetrics, Telemetry
from raycake.transfer.ray_direct import RAY_DIRECT_ACTOR_OPTIONS, connect_ray_direct

# How long a retry waits for a restarting instance (its engine loads and calibrates).
INSTANCE_RESTART_TIMEOUT_S = 60.0


@dataclass
class ClusterOutput:
    """One request's result through the disaggregated cluster."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "rejected" or "error"
    error: str | None = None  # why, for "rejected" and "error"
    ttft_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_store_blocks: int = 0
    kv_bytes: int = 0
    prefill_instance: str | None = None
    decode_instance: str | None = None
    attempts: int = 0

    @property
    def tbt_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def _actor_options(config: ClusterConfig, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": config.namespace,
        "num_cpus": config.instance_num_cpus,
        "num_gpus": config.instance_num_gpus,
        "resources": dict(config.instance_resources),
        "max_restarts": config.actor_max_restarts,
        **extra,
    }


class Cluster:
    """The driver's handle on a running raycake deployment."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._ids = itertools.count()
        model_dir = resolve_model_path(config.engine.model)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        model_config = read_model_config(model_dir)
        self.block_size = config.engine.cache.block_size
        self.telemetry = Telemetry(config.telemetry, "driver")

        if not ray.is_initialized():
            # Join a running cluster (ray start, KubeRay, ray job submit) when there is one.
            address = config.ray_address or _running_cluster_address()
            ray.init(address=address, namespace=config.namespace)
        self.metrics = ClusterMetrics()
        self.store_shards = [
            ray.remote(KVStoreShard)
            .options(**_actor_options(config, f"raycake-kv-store-{i}", num_cpus=0))
            .remote(i, config.store_capacity_bytes, "lru", config.store_replicate_after_reads)
            for i in range(config.num_store_shards)
        ]
        if config.store_replicate_after_reads is not None and len(self.store_shards) > 1:
            n = len(self.store_shards)
            ray.get(
                [
                    s.connect_replica.remote(self.store_shards[replica_shard(i, n)])
                    for i, s in enumerate(self.store_shards)
                ]
            )
        direct = config.transfer_backend == "ray_direct"
        # The instances compose RayDirectKVEndpoint, whose methods name concurrency groups;
        # Ray Direct Transport also needs tensor transport enabled on the class.
        class_options = dict(RAY_DIRECT_ACTOR_OPTIONS)
        if not direct:
            del class_options["enable_tensor_transport"]
        prefill_cls = ray.remote(**class_options)(PrefillInstance)
        decode_cls = ray.remote(**class_options)(DecodeInstance)
        self.prefill = {
            f"prefill-{i}": prefill_cls.options(
                **_actor_options(config, f"raycake-prefill-{i}")
            ).remote(
                f"prefill-{i}",
                config.engine,
                config.transfer_backend,
                self.store_shards,
                config.telemetry,
            )
            for i in range(config.num_prefill)
        }
        self.decode = {
            f"decode-{i}": decode_cls.options(
                **_actor_options(config, f"raycake-decode-{i}")
            ).remote(
                f"decode-{i}",
                config.engine,
                config.transfer_backend,
                config.telemetry,
            )
            for i in range(config.num_decode)
        }
        prefill_loads = ray.get([a.load.remote() for a in self.prefill.values()])
        self._rdt_coordinator = None
        if direct:
            self._rdt_coordinator = connect_ray_direct(
                [*self.prefill.values(), *self.decode.values()]
            )
        decode_loads = ray.get([a.load.remote() for a in self.decode.values()])
        block_bytes = kv_cache_bytes_per_block(
            model_config, self.block_size, DTYPES[config.engine.dtype]
        )
        store_blocks = config.num_store_shards * config.store_capacity_bytes // block_bytes
        self.conductor = (
            ray.remote(Conductor)
            .options(name="raycake-conductor", namespace=config.namespace, num_cpus=0)
            .remote(
                config.scheduling,
                prefill_loads,
                decode_loads,
                self.block_size,
                block_bytes,
                store_blocks if config.scheduling.use_store else 0,
                config.transfer_bandwidth_bytes_per_s,
            )
        )
        ray.get(self.conductor.ready.remote())

    @classmethod
    def from_config(cls, config: ClusterConfig | str) -> Cluster:
        """Bring the deployment up from a ClusterConfig or a YAML/JSON file path."""
        if not isinstance(config, ClusterConfig):
            config = ClusterConfig.from_file(config)
        return cls(config)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[ClusterOutput]:
        """Run the prompts concurrently through the cluster; outputs in the prompts' order."""
        params = sampling_params or SamplingParams()
        params_list = (
            [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")

        async def run_all() -> list[ClusterOutput]:
            return await asyncio.gather(
                *(self.agenerate(p, sp) for p, sp in zip(prompts, params_list, strict=True))
            )

        return asyncio.run(run_all())

    async def agenerate(self, prompt: str | list[int], params: SamplingParams) -> ClusterOutput:
        """One request to the end, as a coroutine (many run concurrently in one event loop)."""
        final = None
        async for update in self.astream(prompt, params):
            final = update
        assert final is not None
        return final

    async def astream(
        self, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[ClusterOutput]:
        """Yield the request's output each time it grows; the last one is final."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("prompt: encodes to no tokens")
        out = ClusterOutput(request_id=f"cluster-{next(self._ids)}", prompt_token_ids=token_ids)
        started = time.monotonic()
        hashes = block_hashes_for(token_ids, self.block_size)
        with self.telemetry.span("request", None, request_id=out.request_id) as trace:
            for attempt in range(self.config.request_max_retries + 1):
                out.attempts = attempt + 1
                try:
                    async for update in self._attempt(out, hashes, params, started, trace):
                        yield update
                    return
                except RayActorError as exc:
                    # The instance died. Deterministic sampling regenerates the same tokens, so
                    # a retry is safe; the caller already saw the first len(token_ids) of them.
                    if attempt == self.config.request_max_retries or not _replayable(params):
                        out.finish_reason, out.error = "error", f"instance failed: {exc}"
                        yield out
                        return
                    await self._wait_for_instances(out)
                finally:
                    await self.conductor.request_done.remote(out.request_id)

    async def _attempt(
        self,
        out: ClusterOutput,
        hashes: list[bytes],
        params: SamplingParams,
        started: float,
        trace: dict[str, str],
    ) -> AsyncIterator[ClusterOutput]:
        with self.telemetry.span("conductor", trace, request_id=out.request_id):
            decision = await self.conductor.schedule.remote(
                out.request_id, hashes, len(out.prompt_token_ids), params.max_tokens
            )
        if isinstance(decision, Rejection):
            out.finish_reason, out.error = "rejected", decision.reason
            self.metrics.rejections.inc(tags={"reason": decision.reason.split(":")[0][:40]})
            yield out
            return
        out.prefill_instance = decision.prefill_instance_id
        out.decode_instance = decision.decode_instance_id
        result: PrefillResult = await self.prefill[decision.prefill_instance_id].prefill.remote(
            PrefillWork(
                out.request_id,
                out.prompt_token_ids,
                params,
                decision.fetch_from_store_blocks,
                trace,
            )
        )
        await self.conductor.prefill_done.remote(
            out.request_id,
            result.block_hashes,
            result.store_fetch_bytes,
            result.store_fetch_seconds,
        )
        now = time.monotonic()
        known = len(out.token_ids)  # tokens the caller already has from an earlier attempt
        out.num_cached_tokens = result.num_cached_tokens
        out.num_store_blocks = result.num_store_blocks
        out.kv_bytes = result.kv_bytes
        if out.ttft_s is None:
            out.ttft_s = now - started
            self.metrics.ttft_ms.observe(1000 * out.ttft_s)
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            if result.num_cached_tokens:
                self.metrics.cached_tokens.inc(result.num_cached_tokens)
        if known == 0:
            out.token_ids.append(result.first_token_id)
            out.token_times.append(now)
        if result.finish_reason is not None:
            out.text = self.tokenizer.decode(out.token_ids[:1])
            out.finish_reason = result.finish_reason
            yield out
            return
        if result.kv_bytes:
            self.metrics.kv_bytes.inc(result.kv_bytes)
        work = DecodeWork(
            out.request_id,
            out.prompt_token_ids,
            result.first_token_id,
            params,
            result.kv_handle,
            trace,
        )
        # The decode instance streams the text of every token from the first one on (it
        # detokenizes with stop strings); a retry rebuilds the same text from scratch.
        out.text = ""
        try:
            async for update in self._decode_stream(out, decision.decode_instance_id, work, known):
                yield update
        finally:
            # Whatever happened, the prefill instance may drop its published copy of the KV.
            self.prefill[decision.prefill_instance_id].release.remote(result.kv_handle)

    async def _decode_stream(
        self, out: ClusterOutput, decode_id: str, work: DecodeWork, known: int
    ) -> AsyncIterator[ClusterOutput]:
        produced = 1
        async for ref in self.decode[decode_id].generate.remote(work):
            delta = await ref
            out.text += delta.text
            for token in delta.token_ids:
                produced += 1
                if produced > len(out.token_ids):  # beyond what an earlier attempt delivered
                    now = time.monotonic()
                    self.metrics.tbt_ms.observe(1000 * (now - out.token_times[-1]))
                    out.token_ids.append(token)
                    out.token_times.append(now)
            if delta.finished:
                out.finish_reason = delta.finish_reason
            if produced > known or delta.finished:
                yield out
            if delta.finished:
                return

    async def _wait_for_instances(self, out: ClusterOutput) -> None:
        """Give a restarting instance (Ray ``max_restarts``) time to come back before a retry."""
        actors = [
            self.prefill.get(out.prefill_instance or ""),
            self.decode.get(out.decode_instance or ""),
        ]
        for actor in actors:
            if actor is None:
                continue
            deadline = time.monotonic() + INSTANCE_RESTART_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    await actor.ready.remote()
                    break
                except ActorDiedError:
                    break  # dead for good: the retry fails too, and reports it
                except RayActorError:
                    await asyncio.sleep(0.2)  # restarting

    def reset_prefix_cache(self) -> None:
        """Drop every prefill instance's local prefix cache; the KV store keeps its blocks."""
        ray.get([a.reset_prefix_cache.remote() for a in self.prefill.values()])
        ray.get(self.conductor.forget_instance_caches.remote())

    def shutdown(self) -> None:
        for actor in [
            *self.prefill.values(),
            *self.decode.values(),
            *self.store_shards,
            self.conductor,
        ]:
            ray.kill(actor)


def _running_cluster_address() -> str | None:
    """ "auto" when a Ray cluster is reachable (RAY_ADDRESS set, or `ray start` ran), else None:
    ``ray.init`` then starts a local one."""
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    try:
        ray.init(address="auto", namespace="raycake-probe")
    except (ConnectionError, RuntimeError):
        return None
    ray.shutdown()
    return "auto"


def _replayable(params: SamplingParams) -> bool:
    return params.is_greedy or params.seed is not None
