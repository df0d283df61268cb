"""ClusterConfig: the shipped example configs parse, and a YAML file reaches every nested section."""

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


def test_titans_cluster_config_serves_the_titans_model():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-titans.yaml")
    assert config.engine.model == "default-titans"
    assert config.engine.cache.memory_state_bytes == 256 * 2**20
    assert config.engine.speculative is None  # Titans refuses speculative decoding


def test_kuberay_job_asks_for_the_instance_resource():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-demo.yaml").read_text())
    assert job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert "raycake_instance" in spec["workerGroupSpecs"][0]["rayStartParams"]["resources"]


def test_kuberay_cluster_config_places_instances_on_the_worker_group():
    config = ClusterConfig.from_file(ROOT / "examples" / "cluster-kuberay.yaml")
    assert config.instance_resources == {"raycake_instance": 1}


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
