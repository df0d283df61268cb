"""ClusterConfig: the shipped example configs parse, and a YAML file reaches every nested section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raycake.cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]


def test_example_cluster_config_loads():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster.yaml")
    assert (config.num_prefill, config.num_decode, config.num_store_shards) == (2, 2, 2)
    assert config.scheduling.policy == "cache_aware" and config.scheduling.ttft_slo_s == 2.0
    assert config.store_replicate_after_reads == 4


def test_titans_cluster_config_serves_the_titans_model():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-titans.yaml")
    assert config.engine.model == "default-titans"
    assert config.engine.cache.memory_state_bytes == 256 * 2**20
    assert config.engine.speculative is None  # Titans refuses speculative decoding


def kuberay_worker_resources(manifest: str) -> dict[str, dict[str, float]]:
    """Each worker group's custom resources in a deploy/kuberay manifest, by group name."""
    resource = yaml.safe_load((ROOT / "deploy" / "kuberay" / manifest).read_text())
    spec = resource["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    assert cluster["enableInTreeAutoscaling"] is True
    # rayStartParams values are strings; `resources` is a quoted JSON object, as in KubeRay's docs.
    return {
        group["groupName"]: json.loads(json.loads(group["rayStartParams"]["resources"]))
        for group in cluster["workerGroupSpecs"]
    }


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob-demo.yaml", "rayservice.yaml"])
def test_kuberay_worker_groups_offer_one_resource_per_role(manifest):
    groups = kuberay_worker_resources(manifest)
    assert set(groups) == {"prefill", "decode"}
    # One instance of its role per pod, and never the other role's resource.
    assert groups["prefill"]["raycake_prefill"] == groups["decode"]["raycake_decode"] == 1
    assert "raycake_decode" not in groups["prefill"] and "raycake_prefill" not in groups["decode"]


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob-demo.yaml", "rayservice.yaml"])
def test_kuberay_cluster_config_asks_only_for_what_every_worker_group_offers(manifest):
    # One instance_resources for every actor (instances and store shards) today, so any group
    # may have to host any of them.
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-kuberay.yaml")
    assert config.instance_resources == {"raycake_instance": 1}
    for name, offered in kuberay_worker_resources(manifest).items():
        for resource, amount in config.instance_resources.items():
            assert offered.get(resource, 0) >= amount, (name, resource)


def test_cluster_yaml_turns_on_int8_and_expert_shards(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "engine:\n  model: default-moe\n  quantization: int8\n  int8_threshold: 4.0\n"
        "  moe:\n    num_expert_shards: 2\n    expert_transport: calls\n"
    )
    engine = ClusterConfig.from_file(path).engine
    assert (engine.model, engine.quantization, engine.int8_threshold) == (
        "default-moe",
        "int8",
        4.0,
    )
    assert (engine.moe.num_expert_shards, engine.moe.expert_transport) == (2, "calls")
