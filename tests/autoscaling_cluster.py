"""Ray's own autoscaler on one machine: ``ray.cluster_utils.AutoscalingCluster`` (the fake
multi-node provider: each "node" is a raylet started and stopped by the real autoscaler).

Ray 2.60's wheel does not ship the provider's default config (``fake_multi_node/example.yaml``),
which both ``AutoscalingCluster`` and the autoscaler's monitor read for provider type
``fake_multinode``. So the config is given here, and the same provider class is named as an
``external`` provider (whose defaults are built in); starting, scaling and stopping are Ray's. NOTE: ``start`` and ``shutdown`` run ``ray stop --force``, which ends every
Ray process on the machine: tests using this are marked ``stops_ray`` and run last.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import AutoscalingCluster

# The fake provider's cluster config (the fields of Ray's fake_multi_node/example.yaml).
FAKE_MULTINODE_BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "external",
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


class LocalAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` with the base config above instead of the file the wheel lacks."""

    def _generate_config(
        self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **kwargs
    ) -> dict[str, Any]:
        config = copy.deepcopy(FAKE_MULTINODE_BASE_CONFIG)
        config["available_node_types"] = {
            **copy.deepcopy(worker_node_types),
            "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
        }
        if autoscaler_v2:
            config["provider"]["launch_multiple"] = True
            config["provider"]["head_node_id"] = FAKE_HEAD_NODE_ID
        config.update(kwargs)
        return config
