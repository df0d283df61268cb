"""The config root: one tree whose sections each live beside their layer, loaded from a file."""

from __future__ import annotations

import subprocess
import sys

import raycake.config as root
from raycake.cluster.config import ClusterConfig
from raycake.engine.config import EngineConfig


def test_the_root_names_each_layers_config_class_itself():
    from raycake.engine.spec.config import SpeculativeConfig
    from raycake.model.config import ModelConfig
    from raycake.policies.scheduling_config import SchedulingConfig

    assert root.SpeculativeConfig is SpeculativeConfig
    assert root.ModelConfig is ModelConfig
    assert root.SchedulingConfig is SchedulingConfig
    assert root.ClusterConfig().engine == EngineConfig()


def test_load_config_picks_the_root_from_the_file(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("num_decode: 2\nengine:\n  cache:\n    block_size: 32\n")
    engine = tmp_path / "engine.yaml"
    engine.write_text("dtype: bfloat16\nscheduler:\n  max_num_seqs: 8\n")
    loaded = root.load_config(cluster)
    assert isinstance(loaded, ClusterConfig)
    assert (loaded.num_decode, loaded.engine.cache.block_size) == (2, 32)
    loaded = root.load_config(engine)
    assert isinstance(loaded, EngineConfig)
    assert (loaded.dtype, loaded.scheduler.max_num_seqs) == ("bfloat16", 8)


def test_the_simulator_and_the_policies_import_without_ray_or_torch():
    code = (
        "import sys\n"
        "import raycake.sim.cli, raycake.sim.simulate, raycake.policies.scheduling\n"
        "import raycake.policies.speculation, raycake.engine.spec.config, raycake.config\n"
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
