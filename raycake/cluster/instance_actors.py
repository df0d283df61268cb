"""The named Ray actor of one prefill or decode instance: its name, resources and options.
Used at launch (``deployment``) and by the autoscaler when it adds an instance."""

from __future__ import annotations

from typing import Any

import ray

from raycake.actors.decode import DecodeInstance
from raycake.actors.prefill import PrefillInstance
from raycake.cluster.config import ClusterConfig
from raycake.transfer.ray_direct import RAY_DIRECT_ACTOR_OPTIONS
from raycake.validation import require


def actor_options(
    config: ClusterConfig, name: str, resources: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """Ray options of a named, restartable actor placed by ``resources``."""
    return {
        "name": name,
        "namespace": config.namespace,
        "num_cpus": config.instance_num_cpus,
        "num_gpus": config.instance_num_gpus,
        "resources": dict(resources),
        "max_restarts": config.actor_max_restarts,
        **extra,
    }


def instance_actor_name(instance_id: str) -> str:
    """The Ray actor name of instance ``prefill-3`` / ``decode-0``: ``raycake-prefill-3``."""
    return f"raycake-{instance_id}"


def start_instance(
    config: ClusterConfig, instance_id: str, store_shards: list[Any], *, detached: bool = False
) -> Any:
    """Create the named actor of one prefill or decode instance (``prefill-N`` / ``decode-N``),
    asking for its role's resources so that Ray's autoscaler adds a node that offers them.
    ``detached``: the actor outlives its creator (an instance the autoscaler actor adds must
    not die with it); whoever removes the instance kills it."""
    role = instance_id.split("-")[0]
    require(role in ("prefill", "decode"), "instance_id", "prefill-N or decode-N", instance_id)
    direct = config.transfer_backend == "ray_direct"
    # The instances compose RayDirectKVEndpoint, whose methods name concurrency groups;
    # Ray Direct Transport also needs tensor transport enabled on the class.
    class_options = dict(RAY_DIRECT_ACTOR_OPTIONS)
    if not direct:
        del class_options["enable_tensor_transport"]
    cls = PrefillInstance if role == "prefill" else DecodeInstance
    extra = {"lifetime": "detached"} if detached else {}
    options = actor_options(
        config, instance_actor_name(instance_id), config.role_resources(role), **extra
    )
    actor_cls = ray.remote(**class_options)(cls).options(**options)
    if role == "prefill":
        return actor_cls.remote(
            instance_id, config.engine, config.transfer_backend, store_shards, config.telemetry
        )
    return actor_cls.remote(instance_id, config.engine, config.transfer_backend, config.telemetry)


# find_instances looks names up until this many consecutive indices of a role are free.
PROBE_MISSES = 16


def find_instances(config: ClusterConfig) -> dict[str, Any]:
    """The deployment's instance actors alive now, by id, found by name: also those no conductor
    knows (the autoscaler and the conductor restarted together). Blocking GCS lookups."""
    found: dict[str, Any] = {}
    for role in ("prefill", "decode"):
        index = misses = 0
        while misses < PROBE_MISSES:
            instance_id = f"{role}-{index}"
            try:
                found[instance_id] = ray.get_actor(
                    instance_actor_name(instance_id), namespace=config.namespace
                )
                misses = 0
            except ValueError:
                misses += 1
            index += 1
    return found
