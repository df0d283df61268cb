"""A deployment's named Ray actors: launched from a ``ClusterConfig``, or found by name when
another driver launched them (an HTTP replica is one more driver over the same actors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from raycake.actors.conductor import Conductor
from raycake.actors.decode import DecodeInstance
from raycake.actors.kv_store import KVStoreShard, replica_shard
from raycake.actors.prefill import PrefillInstance
from raycake.cluster.config import ClusterConfig
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.model.config import ModelConfig
from raycake.model.loader import DTYPES
from raycake.transfer.ray_direct import RAY_DIRECT_ACTOR_OPTIONS, connect_ray_direct


@dataclass(frozen=True)
class Deployment:
    """Actor handles, by role; instances keyed by instance id (``prefill-0``, ``decode-0``)."""

    store_shards: list[Any]
    prefill: dict[str, Any]
    decode: dict[str, Any]
    conductor: Any
    rdt_coordinator: Any | None  # the Ray Direct Transport coordinator, when that backend runs


def actor_options(config: ClusterConfig, name: str, **extra: Any) -> dict[str, Any]:
    """Ray options of a named, restartable actor placed by the deployment's resources."""
    return {
        "name": name,
        "namespace": config.namespace,
        "num_cpus": config.instance_num_cpus,
        "num_gpus": config.instance_num_gpus,
        "resources": dict(config.instance_resources),
        "max_restarts": config.actor_max_restarts,
        **extra,
    }


def attach_deployment(config: ClusterConfig) -> Deployment:
    """The named actors another driver launched in ``config.namespace``."""

    def actor(name: str):
        return ray.get_actor(name, namespace=config.namespace)

    store_shards = [actor(f"raycake-kv-store-{i}") for i in range(config.num_store_shards)]
    prefill = {f"prefill-{i}": actor(f"raycake-prefill-{i}") for i in range(config.num_prefill)}
    decode = {f"decode-{i}": actor(f"raycake-decode-{i}") for i in range(config.num_decode)}
    return Deployment(store_shards, prefill, decode, actor("raycake-conductor"), None)


def launch_deployment(
    config: ClusterConfig, model_config: ModelConfig, max_model_len: int
) -> Deployment:
    """Create the deployment's named actors (store shards, instances, then the conductor,
    which plans with the instances' first loads) and wait until each answers."""
    store_shards = [
        ray.remote(KVStoreShard)
        .options(**actor_options(config, f"raycake-kv-store-{i}", num_cpus=0))
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
    direct = config.transfer_backend == "ray_direct"
    # The instances compose RayDirectKVEndpoint, whose methods name concurrency groups;
    # Ray Direct Transport also needs tensor transport enabled on the class.
    class_options = dict(RAY_DIRECT_ACTOR_OPTIONS)
    if not direct:
        del class_options["enable_tensor_transport"]
    prefill_cls = ray.remote(**class_options)(PrefillInstance)
    decode_cls = ray.remote(**class_options)(DecodeInstance)
    prefill = {
        f"prefill-{i}": prefill_cls.options(**actor_options(config, f"raycake-prefill-{i}")).remote(
            f"prefill-{i}",
            config.engine,
            config.transfer_backend,
            store_shards,
            config.telemetry,
        )
        for i in range(config.num_prefill)
    }
    decode = {
        f"decode-{i}": decode_cls.options(**actor_options(config, f"raycake-decode-{i}")).remote(
            f"decode-{i}",
            config.engine,
            config.transfer_backend,
            config.telemetry,
        )
        for i in range(config.num_decode)
    }
    prefill_loads = ray.get([a.load.remote() for a in prefill.values()])
    rdt_coordinator = None
    if direct:
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
    return Deployment(store_shards, prefill, decode, conductor, rdt_coordinator)


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
