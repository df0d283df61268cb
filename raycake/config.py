"""The root of raycake's one configuration tree.

Each layer's configuration sits beside the layer and is validated there, with messages that
name the field: the model's shape and MoE settings in ``model/config.py``, one instance's cache,
scheduler and speculation in ``engine/config.py`` and ``engine/spec/config.py``, the conductor's
policy in ``policies/scheduling_config.py``, the deployment in ``cluster/config.py``, training in
``training/config.py``. ``ClusterConfig`` composes a deployment (it holds an ``EngineConfig``,
which holds the cache, scheduler, MoE and speculation configs); this module names them all in one
place for users, and builds either root from a YAML or JSON file.
"""

from __future__ import annotations

from pathlib import Path

from raycake.cluster.config import ClusterConfig, HttpConfig, TelemetryConfig
from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.spec.config import SpeculativeConfig
from raycake.model.config import ModelConfig, MoEConfig, RopeScaling
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.training.config import EagleTrainConfig, TrainConfig
from raycake.validation import read_mapping

__all__ = [
    "CacheConfig",
    "ClusterConfig",
    "EagleTrainConfig",
    "EngineConfig",
    "HttpConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeScaling",
    "SchedulerConfig",
    "SchedulingConfig",
    "SpeculativeConfig",
    "TelemetryConfig",
    "TrainConfig",
    "load_config",
]


def load_config(path: str | Path) -> ClusterConfig | EngineConfig:
    """A ``ClusterConfig`` from a file with an ``engine`` section or any cluster field, else an
    ``EngineConfig``: the two roots a user writes a file for."""
    data = read_mapping(path)
    engine_fields = set(EngineConfig.__dataclass_fields__)
    if "engine" in data or not set(data) <= engine_fields:
        return ClusterConfig.from_dict(data)
    return EngineConfig.from_dict(data)
