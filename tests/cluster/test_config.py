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
def test_kuberay_cluster_config_places_each_role_on_its_own_group(manifest):
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-kuberay.yaml")
    groups = kuberay_worker_resources(manifest)
    for role in ("prefill", "decode"):
        asked = config.role_resources(role)
        assert asked, role
        # The role's group offers what its instances ask for; the other group does not.
        assert all(groups[role].get(r, 0) >= amount for r, amount in asked.items()), role
        other = "decode" if role == "prefill" else "prefill"
        assert not all(groups[other].get(r, 0) >= amount for r, amount in asked.items()), role
    # Store shards ask for nothing a worker group offers: they run anywhere (the head).
    assert config.store_resources == {}
    # The planner's bounds are the groups' replica bounds.
    resource = yaml.safe_load((ROOT / "deploy" / "kuberay" / manifest).read_text())["spec"]
    cluster = resource.get("rayClusterSpec") or resource.get("rayClusterConfig") or resource
    bounds = {
        g["groupName"]: (g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]
    }
    assert config.planner.name == "slo"
    assert bounds == {role: config.planner.bounds(role) for role in ("prefill", "decode")}


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
