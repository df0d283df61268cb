"""A deployment's named Ray actors: launched from a ``ClusterConfig``, or found by name when
another driver launched them (an HTTP replica is one more driver over the same actors)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

from raycake.actors.autoscaler import Autoscaler
from raycake.actors.conductor import Conductor
from raycake.actors.kv_store import KVStoreShard, replica_shard
from raycake.cluster.config import ClusterConfig
from raycake.cluster.instance_actors import actor_options, find_instances, start_instance
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.model.config import ModelConfig
from raycake.model.loader import DTYPES, read_model_config, resolve_model_path
from raycake.transfer.ray_direct import connect_ray_direct

# How long shutdown waits for the autoscaler's or the conductor's list of instances.
SHUTDOWN_CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Deployment:
    """Actor handles, by role; instances keyed by instance id (``prefill-0``, ``decode-0``)."""

    store_shards: list[Any]
    prefill: dict[str, Any]
    decode: dict[str, Any]
    conductor: Any
    rdt_coordinator: Any | None  # the Ray Direct Transport coordinator, when that backend runs
    autoscaler: Any  # adds and drains instances (runs the planner unless it is "fixed")


def attach_deployment(config: ClusterConfig) -> Deployment:
    """The named actors another driver launched in ``config.namespace`` (with the instances the
    autoscaler added since, as the conductor knows them)."""

    def actor(name: str):
        return ray.get_actor(name, namespace=config.namespace)

    store_shards = [actor(f"raycake-kv-store-{i}") for i in range(config.num_store_shards)]
    conductor = actor("raycake-conductor")
    instances: dict[str, Any] = ray.get(conductor.instances.remote())
    prefill = {iid: a for iid, a in instances.items() if iid.startswith("prefill-")}
    decode = {iid: a for iid, a in instances.items() if iid.startswith("decode-")}
    autoscaler = actor("raycake-autoscaler")
    return Deployment(store_shards, prefill, decode, conductor, None, autoscaler)


def launch_deployment(
    config: ClusterConfig, model_config: ModelConfig, max_model_len: int, *, detached: bool = False
) -> Deployment:
    """Create the deployment's named actors (store shards, instances, then the conductor,
    which plans with the instances' first loads, then the autoscaler) and wait until each
    answers. ``detached``: they outlive the process that creates them (a Serve application
    builder's task); ``shutdown_deployment`` ends them."""
    lifetime = {"lifetime": "detached"} if detached else {}
    store_shards = [
        ray.remote(KVStoreShard)
        .options(
            **actor_options(
                config,
                f"raycake-kv-store-{i}",
                config.store_resources,
                num_cpus=0,
                num_gpus=0,
                **lifetime,
            )
        )
        .remote(i, config.store_capacity_bytes, "lru", config.store_replicate_after_reads)
        for i in range(config.num_store_shards)
    ]
    if config.store_replicate_after_reads is not None and len(store_shards) > 1:
        n = len(store_shards)
        ray.get(
            [
                s.connect_replica.remote(store_shards[replica_shard(i, n)])
                for i, s in enumerate(store_shards)
            ]
        )
    prefill = {
        f"prefill-{i}": start_instance(config, f"prefill-{i}", store_shards, detached=detached)
        for i in range(config.num_prefill)
    }
    decode = {
        f"decode-{i}": start_instance(config, f"decode-{i}", store_shards, detached=detached)
        for i in range(config.num_decode)
    }
    prefill_loads = ray.get([a.load.remote() for a in prefill.values()])
    rdt_coordinator = None
    if config.transfer_backend == "ray_direct":
        rdt_coordinator = connect_ray_direct([*prefill.values(), *decode.values()])
    decode_loads = ray.get([a.load.remote() for a in decode.values()])
    block_bytes = kv_cache_bytes_per_block(
        model_config, config.engine.cache.block_size, DTYPES[config.engine.dtype]
    )
    store_blocks = config.num_store_shards * config.store_capacity_bytes // block_bytes
    # Restarted like every actor; its calls are retried across a restart (they are safe to
    # repeat: a schedule that never returned reserved nothing a restarted conductor knows).
    conductor = (
        ray.remote(Conductor)
        .options(
            name="raycake-conductor",
            namespace=config.namespace,
            num_cpus=0,
            max_restarts=config.actor_max_restarts,
            max_task_retries=-1,
            **lifetime,
        )
        .remote(
            config.scheduling,
            prefill_loads,
            decode_loads,
            config.engine.cache.block_size,
            block_bytes,
            store_blocks if config.scheduling.use_store else 0,
            config.transfer_bandwidth_bytes_per_s,
            max_model_len=max_model_len,
            instances={**prefill, **decode},
            store_shards=store_shards if config.scheduling.use_store else [],
        )
    )
    ray.get(conductor.ready.remote())
    # Always there, so that an operator can scale a "fixed" deployment by hand (scale_to).
    autoscaler = (
        ray.remote(Autoscaler)
        .options(
            name="raycake-autoscaler",
            namespace=config.namespace,
            num_cpus=0,
            max_restarts=config.actor_max_restarts,
            max_task_retries=-1,
            **lifetime,
        )
        .remote(config, conductor, store_shards)
    )
    ray.get(autoscaler.start.remote())
    return Deployment(store_shards, prefill, decode, conductor, rdt_coordinator, autoscaler)


def ensure_deployment(config: ClusterConfig) -> bool:
    """Launch ``config``'s deployment, detached, unless its conductor already runs in
    ``config.namespace``; returns whether it launched. (Two builders racing: the loser finds
    the names taken and uses the winner's actors.)"""
    if deployment_is_running(config):
        return False
    model_dir = resolve_model_path(config.engine.model)
    model_config = read_model_config(model_dir)
    max_model_len = config.engine.scheduler.max_model_len or model_config.max_position_embeddings
    try:
        launch_deployment(config, model_config, max_model_len, detached=True)
    except ValueError as exc:
        if "already" not in str(exc) or not deployment_is_running(config):
            raise
        return False
    return True


def deployment_is_running(config: ClusterConfig) -> bool:
    try:
        ray.get_actor("raycake-conductor", namespace=config.namespace)
    except ValueError:
        return False
    return True


def shutdown_deployment(config: ClusterConfig) -> int:
    """Kill every actor of the deployment in ``config.namespace``, found by name (detached ones
    included): the autoscaler first, so that it starts nothing more. Returns how many."""

    def named(name: str) -> Any | None:
        try:
            return ray.get_actor(name, namespace=config.namespace)
        except ValueError:
            return None

    actors: list[Any] = []
    autoscaler, conductor = named("raycake-autoscaler"), named("raycake-conductor")
    if autoscaler is not None:
        with contextlib.suppress(RayError):
            actors += ray.get(autoscaler.stop.remote(), timeout=SHUTDOWN_CALL_TIMEOUT_S)
        actors.append(autoscaler)
    if conductor is not None:
        with contextlib.suppress(RayError, TimeoutError):
            actors += ray.get(
                conductor.instances.remote(), timeout=SHUTDOWN_CALL_TIMEOUT_S
            ).values()
        actors.append(conductor)
    actors += [named(f"raycake-kv-store-{i}") for i in range(config.num_store_shards)]
    actors += find_instances(config).values()  # also those neither of them knows
    killed = set()
    for actor in actors:
        if actor is None or actor._actor_id in killed:
            continue
        with contextlib.suppress(ValueError):
            ray.kill(actor)
        killed.add(actor._actor_id)
    return len(killed)


def running_cluster_address() -> str | None:
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
