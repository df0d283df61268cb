"""ClusterConfig -> named Ray actors, and the driver-side path of every request.

A request: checked before any work (``admission``) -> hash the prompt into blocks ->
Conductor.schedule (or early rejection) -> PrefillInstance.prefill (store prefix fetched, KV
published) -> DecodeInstance.generate (streamed) -> Conductor.request_done.

Faults. Every actor restarts (``actor_max_restarts``); the conductor's calls are retried by Ray
across its restarts and it rebuilds its books from the instances and the store. When an
instance dies mid-request (or the KV it published is lost with it), the driver reports it down to
the conductor, waits for it to answer again, and retries the request, up to
``request_max_retries`` times: always when no token has reached the caller yet; once tokens have,
only when sampling is deterministic (greedy or seeded), and the replayed tokens are checked
against the delivered ones. Otherwise the request ends with ``finish_reason "error"`` and the
cause: never lost, never duplicated or spliced. A caller that goes away cancels the request in
the actors that hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ObjectLostError, RayActorError, RayError

from raycake.actors.autoscaler import ScalingStatus
from raycake.actors.messages import DecodeWork, PrefillResult, PrefillWork
from raycake.cluster.admission import ModelLimits, check_request
from raycake.cluster.config import ClusterConfig
from raycake.cluster.deployment import (
    attach_deployment,
    launch_deployment,
    running_cluster_address,
    shutdown_deployment,
)
from raycake.cluster.instance_actors import instance_actor_name
from raycake.engine.kv_cache import block_hashes_for
from raycake.engine.sampling_params import SamplingParams
from raycake.model.loader import read_model_config, resolve_model_path
from raycake.model.tokenizer import Tokenizer
from raycake.policies.scheduling import Rejection
from raycake.telemetry import ClusterMetrics, Telemetry
from raycake.transfer.base import KVLostError
from raycake.validation import check_int, check_number

# How long a retry waits for a restarting instance (its engine loads and calibrates).
INSTANCE_RESTART_TIMEOUT_S = 60.0
# Faults a retry can cure: the actor died or restarts, or what it published died with it.
RETRYABLE_FAULTS = (RayActorError, ObjectLostError, KVLostError)


@dataclass(frozen=True)
class _RequestSLO:
    """One request's SLOs for the conductor; None: the configured ones."""

    ttft_s: float | None = None
    tbt_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("ttft_slo_s", self.ttft_s), ("tbt_slo_s", self.tbt_s)):
            if value is not None:
                check_number(name, value, low=0, low_exclusive=True)


class ReplayMismatch(RuntimeError):
    """A retried request regenerated tokens that differ from those already delivered."""


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


class Cluster:
    """The driver's handle on a running raycake deployment."""

    def __init__(self, config: ClusterConfig, *, attach: bool = False) -> None:
        """Launch the deployment's named actors, or with ``attach`` find those another driver
        launched (an HTTP ingress replica is one more driver over the same actors)."""
        self.config = config
        self._ids = itertools.count()
        model_dir = resolve_model_path(config.engine.model)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        model_config = read_model_config(model_dir)
        self.limits = ModelLimits(
            vocab_size=model_config.vocab_size,
            max_model_len=config.engine.scheduler.max_model_len
            or model_config.max_position_embeddings,
        )
        self.block_size = config.engine.cache.block_size
        self.telemetry = Telemetry(config.telemetry, "driver")

        if not ray.is_initialized():
            # Join a running cluster (ray start, KubeRay, ray job submit) when there is one.
            address = config.ray_address or running_cluster_address()
            ray.init(address=address, namespace=config.namespace)
        self.metrics = ClusterMetrics()
        self.owns_actors = not attach  # only the launching driver shuts the actors down
        deployment = (
            attach_deployment(config)
            if attach
            else launch_deployment(config, model_config, self.limits.max_model_len)
        )
        self.store_shards = deployment.store_shards
        self.prefill = deployment.prefill
        self.decode = deployment.decode
        self.conductor = deployment.conductor
        self.autoscaler = deployment.autoscaler
        self._rdt_coordinator = deployment.rdt_coordinator

    @classmethod
    def from_config(cls, config: ClusterConfig | str) -> Cluster:
        """Bring the deployment up from a ClusterConfig or a YAML/JSON file path."""
        if not isinstance(config, ClusterConfig):
            config = ClusterConfig.from_file(config)
        return cls(config)

    @classmethod
    def attach(cls, config: ClusterConfig) -> Cluster:
        """A driver over the running deployment ``config`` describes (same namespace)."""
        return cls(config, attach=True)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or a ``ValueError`` naming the field, before any work."""
        return check_request(prompt, params, self.tokenizer, self.limits)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[ClusterOutput]:
        """Run the prompts concurrently through the cluster; one output per prompt, in order.

        Every prompt is checked before any is sent (a ``ValueError`` names the first bad one);
        a request that fails later ends as ``finish_reason "error"`` without affecting others.
        """
        params = sampling_params or SamplingParams()
        params_list = (
            [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        token_lists = []
        for i, (prompt, sp) in enumerate(zip(prompts, params_list, strict=True)):
            try:
                token_lists.append(self.check_request(prompt, sp))
            except ValueError as exc:
                raise ValueError(f"prompts[{i}]: {exc}") from None

        async def run_all() -> list[ClusterOutput]:
            # The checked token ids go on, so no prompt is tokenized twice.
            return await asyncio.gather(
                *(self.agenerate(ids, sp) for ids, sp in zip(token_lists, params_list, strict=True))
            )

        return asyncio.run(run_all())

    async def agenerate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> ClusterOutput:
        """One request to the end, as a coroutine (many run concurrently in one event loop)."""
        final = None
        stream = self.astream(prompt, params, ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s)
        async with contextlib.aclosing(stream):
            async for update in stream:
                final = update
        assert final is not None
        return final

    async def astream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> AsyncIterator[ClusterOutput]:
        """Yield the request's output each time it grows; the last one is final (its
        ``finish_reason`` is set). Closing the stream early cancels the request everywhere.

        ``ttft_slo_s`` / ``tbt_slo_s``: this request's SLOs, in place of the configured ones
        (the conductor rejects it early when no pair of instances is predicted to meet them)."""
        token_ids = self.check_request(prompt, params)
        slo = _RequestSLO(ttft_slo_s, tbt_slo_s)
        out = ClusterOutput(request_id=f"cluster-{next(self._ids)}", prompt_token_ids=token_ids)
        started = time.monotonic()
        hashes = block_hashes_for(token_ids, self.block_size)
        delivered = 0  # tokens the caller has seen
        with self.telemetry.span("request", None, request_id=out.request_id) as trace:
            for attempt in range(self.config.request_max_retries + 1):
                out.attempts = attempt + 1
                try:
                    async with contextlib.aclosing(
                        self._attempt(out, hashes, params, slo, started, trace, delivered)
                    ) as updates:
                        async for update in updates:
                            delivered = len(update.token_ids)
                            yield update
                    return
                except RETRYABLE_FAULTS as exc:
                    cause = f"{type(exc).__name__}: {_first_line(exc)}"
                    if attempt == self.config.request_max_retries:
                        reason = f"instance failed after {attempt + 1} attempts: {cause}"
                    elif delivered and not _replayable(params):
                        reason = (
                            f"instance failed after {delivered} tokens were delivered, and the "
                            f"request cannot be replayed (sampling is random without a seed; "
                            f"set temperature 0 or a seed to make it retryable): {cause}"
                        )
                    else:
                        # Forget what the caller never saw; what it saw is checked on replay.
                        del out.token_ids[delivered:], out.token_times[delivered:]
                        if not delivered:
                            out.ttft_s = None
                        await self._wait_for_instances(out)
                        continue
                    yield _ended(out, "error", reason)
                    return
                except ReplayMismatch as exc:
                    yield _ended(out, "error", str(exc))
                    return
                except RayError as exc:
                    # The request's own fault on an actor (it cannot fit there, a failed step):
                    # a retry would fail the same way.
                    yield _ended(out, "error", f"{type(exc).__name__}: {_first_line(exc)}")
                    return

    async def _attempt(
        self,
        out: ClusterOutput,
        hashes: list[bytes],
        params: SamplingParams,
        slo: _RequestSLO,
        started: float,
        trace: dict[str, str],
        known: int,
    ) -> AsyncIterator[ClusterOutput]:
        """One try; ``known`` tokens were delivered by earlier tries (a replay must match)."""
        try:
            async with contextlib.aclosing(
                self._scheduled_attempt(out, hashes, params, slo, started, trace, known)
            ) as updates:
                async for update in updates:
                    yield update
        finally:
            await self._tell_conductor("request_done", out.request_id)

    async def _scheduled_attempt(
        self,
        out: ClusterOutput,
        hashes: list[bytes],
        params: SamplingParams,
        slo: _RequestSLO,
        started: float,
        trace: dict[str, str],
        known: int,
    ) -> AsyncIterator[ClusterOutput]:
        with self.telemetry.span("conductor", trace, request_id=out.request_id):
            decision = await self.conductor.schedule.remote(
                out.request_id,
                hashes,
                len(out.prompt_token_ids),
                params.max_tokens,
                slo.ttft_s,
                slo.tbt_s,
            )
        if isinstance(decision, Rejection):
            out.finish_reason, out.error = "rejected", decision.reason
            self.metrics.rejections.inc(tags={"reason": decision.reason.split(":")[0][:40]})
            yield out
            return
        out.prefill_instance = decision.prefill_instance_id
        out.decode_instance = decision.decode_instance_id
        prefill = await self._instance(decision.prefill_instance_id)
        prefill_ref = prefill.prefill.remote(
            PrefillWork(
                out.request_id,
                out.prompt_token_ids,
                params,
                decision.fetch_from_store_blocks,
                trace,
            )
        )
        try:
            result: PrefillResult = await prefill_ref
        except RETRYABLE_FAULTS:
            await self._tell_conductor("instance_down", decision.prefill_instance_id)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            ray.cancel(prefill_ref)  # the caller went away: the prefill frees what it holds
            raise
        await self._tell_conductor(
            "prefill_done",
            out.request_id,
            result.block_hashes,
            result.store_fetch_bytes,
            result.store_fetch_seconds,
        )
        if result.finish_reason == "error":
            out.finish_reason, out.error = "error", result.error
            yield out
            return
        now = time.monotonic()
        if known and result.first_token_id != out.token_ids[0]:
            raise ReplayMismatch(
                f"the retry's first token {result.first_token_id} differs from the delivered "
                f"{out.token_ids[0]}"
            )
        out.num_cached_tokens = result.num_cached_tokens
        out.num_store_blocks = result.num_store_blocks
        out.kv_bytes = result.kv_bytes
        if out.ttft_s is None:
            out.ttft_s = now - started
            self.metrics.ttft_ms.observe(1000 * out.ttft_s)
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            if result.num_cached_tokens:
                self.metrics.cached_tokens.inc(result.num_cached_tokens)
        if not out.token_ids:
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
            async with contextlib.aclosing(
                self._decode_stream(out, decision.decode_instance_id, work, known)
            ) as updates:
                async for update in updates:
                    yield update
        finally:
            # Whatever happened, the prefill instance may drop its published copy of the KV.
            prefill.release.remote(result.kv_handle)

    async def _decode_stream(
        self, out: ClusterOutput, decode_id: str, work: DecodeWork, known: int
    ) -> AsyncIterator[ClusterOutput]:
        produced = 1
        stream = (await self._instance(decode_id)).generate.remote(work)
        finished = False
        try:
            async for ref in stream:
                delta = await ref
                out.text += delta.text
                for token in delta.token_ids:
                    produced += 1
                    if produced <= known:  # replayed: must be what the caller already has
                        if token != out.token_ids[produced - 1]:
                            raise ReplayMismatch(
                                f"the retry's token {produced - 1} is {token}, but "
                                f"{out.token_ids[produced - 1]} was delivered"
                            )
                        continue
                    if produced > len(out.token_ids):
                        now = time.monotonic()
                        self.metrics.tbt_ms.observe(1000 * (now - out.token_times[-1]))
                        out.token_ids.append(token)
                        out.token_times.append(now)
                finished = delta.finished
                if finished:
                    out.finish_reason = delta.finish_reason
                    out.error = getattr(delta, "error", None)
                if produced > known or finished:
                    yield out
                if finished:
                    return
        except RETRYABLE_FAULTS as exc:
            # A dead decode instance, or KV lost with the prefill instance that published it.
            lost_kv = isinstance(exc, (ObjectLostError, KVLostError))
            await self._tell_conductor(
                "instance_down", out.prefill_instance if lost_kv else decode_id
            )
            raise
        finally:
            if not finished:
                # Failed, or the caller went away: stop the decode (it aborts the request and
                # frees its blocks); harmless when the instance is already gone.
                with contextlib.suppress(Exception):
                    ray.cancel(stream)

    async def _tell_conductor(self, method: str, *args: Any) -> None:
        """Book-keeping calls: Ray retries them across a conductor restart; one that still fails
        (restarts exhausted) must not fail the request, whose result does not depend on it."""
        with contextlib.suppress(RayError):
            await getattr(self.conductor, method).remote(*args)

    async def _wait_for_instances(self, out: ClusterOutput) -> None:
        """Give a restarting instance (Ray ``max_restarts``) time to come back before a retry."""
        actors = [
            self.prefill.get(out.prefill_instance or ""),
            self.decode.get(out.decode_instance or ""),
        ]  # the instances the attempt used, so both are known here
        for actor in actors:
            if actor is None:
                continue
            deadline = time.monotonic() + INSTANCE_RESTART_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    instance_id = await actor.ready.remote()
                    await self._tell_conductor("instance_up", instance_id)
                    break
                except ActorDiedError:
                    break  # dead for good: the retry fails too, and reports it
                except RayActorError:
                    await asyncio.sleep(0.2)  # restarting

    async def _instance(self, instance_id: str) -> Any:
        """An instance's actor handle; one the autoscaler added since is found by its name (a
        GCS lookup, off the event loop: an HTTP replica serves other requests meanwhile)."""
        role = self.prefill if instance_id.startswith("prefill-") else self.decode
        if instance_id not in role:
            role[instance_id] = await asyncio.to_thread(
                ray.get_actor, instance_actor_name(instance_id), namespace=self.config.namespace
            )
        return role[instance_id]

    def _refresh_instances(self) -> None:
        """The instances running now (the autoscaler adds and removes them)."""
        instances = ray.get(self.conductor.instances.remote())
        self.prefill = {i: a for i, a in instances.items() if i.startswith("prefill-")}
        self.decode = {i: a for i, a in instances.items() if i.startswith("decode-")}

    def scale_to(
        self, num_prefill: int, num_decode: int, *, wait: bool = True, timeout_s: float = 600.0
    ) -> ScalingStatus:
        """Run this many prefill and decode instances: new ones are added (placed where their
        role's resources are offered), extra ones drained and removed without cutting a
        request. ``wait``: return once every new instance serves and every drained one is gone.
        An autoscaling planner may change the counts again at its next round."""
        for name, value in (("num_prefill", num_prefill), ("num_decode", num_decode)):
            check_int(name, value, low=1)
        check_number("timeout_s", timeout_s, low=0, low_exclusive=True)
        status = ray.get(self.autoscaler.scale_to.remote(num_prefill, num_decode))
        if wait:
            status = ray.get(self.autoscaler.settle.remote(timeout_s))
        self._refresh_instances()
        return status

    def scaling_status(self) -> ScalingStatus:
        """Instances running, starting and draining by role, and the timeline of changes."""
        return ray.get(self.autoscaler.status.remote())

    def reset_prefix_cache(self) -> None:
        """Drop every prefill instance's local prefix cache; the KV store keeps its blocks."""
        self._refresh_instances()
        ray.get([a.reset_prefix_cache.remote() for a in self.prefill.values()])
        ray.get(self.conductor.forget_instance_caches.remote())

    def shutdown(self) -> None:
        """Kill the deployment's actors (a driver that only attached leaves them running);
        the autoscaler stops first, so it starts nothing more."""
        if not self.owns_actors or not ray.is_initialized():
            return  # nothing to kill: Ray itself is gone
        shutdown_deployment(self.config)
        for actor in [*self.prefill.values(), *self.decode.values()]:
            with contextlib.suppress(ValueError):  # killed already, by name
                ray.kill(actor)


def _replayable(params: SamplingParams) -> bool:
    return params.is_greedy or params.seed is not None


def _ended(out: ClusterOutput, finish_reason: str, error: str) -> ClusterOutput:
    out.finish_reason, out.error = finish_reason, error
    return out


def _first_line(exc: BaseException) -> str:
    """An exception's message without the remote traceback Ray appends."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
