"""The shipped example configs parse into valid ClusterConfigs."""

from __future__ import annotations

from pathlib import Path

import yaml

from raycake.cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]


def test_example_cluster_config_loads():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster.yaml")
    assert (config.num_prefill, config.num_decode, config.num_store_shards) == (2, 2, 2)
    assert config.scheduling.policy == "cache_aware" and config.scheduling.ttft_slo_s == 2.0
    assert config.store_replicate_after_reads == 4


def test_kuberay_job_asks_for_the_instance_resource():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-demo.yaml").read_text())
    assert job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert "raycake_instance" in spec["workerGroupSpecs"][0]["rayStartParams"]["resources"]


def test_kuberay_cluster_config_places_instances_on_the_worker_group():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-kuberay.yaml")
    assert config.instance_resources == {"raycake_instance": 1}
