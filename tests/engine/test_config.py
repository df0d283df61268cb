"""One instance's configs validate on construction, naming the field; files with unknown keys
are refused."""

from __future__ import annotations

import json

import pytest

from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.model.config import MoEConfig


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: CacheConfig(block_size=0), "cache.block_size"),
        (
            lambda: SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=8),
            "max_num_batched_tokens",
        ),
        (lambda: EngineConfig(dtype="int4"), "dtype"),
        (lambda: EngineConfig(quantization="int4"), "quantization"),
        (lambda: EngineConfig(int8_threshold=-1.0), "int8_threshold"),
        (lambda: MoEConfig(expert_transport="nccl"), "moe.expert_transport"),
    ],
)
def test_component_configs_validate(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()


def test_engine_config_from_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "default", "cache": {"block_size": 32}}))
    assert EngineConfig.from_file(path).cache.block_size == 32
    path.write_text(json.dumps({"model": "default", "cache": {"blocksize": 32}}))
    with pytest.raises(ValueError, match="blocksize"):
        EngineConfig.from_file(path)
