"""The MoE load gauges reach Ray's Prometheus export with the engine's numbers."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from raycake.config import EngineConfig, MoEConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.model.moe import MoEStats
from raycake.telemetry import InstanceMetrics
from tests.llama_checkpoints import build_mixtral_checkpoint
from tests.ray_fixture import METRICS_PORT_ENV, ray_session  # noqa: F401 - the session fixture

INSTANCE = "moe-gauge-probe"
MOE_SERIES = ("raycake_moe_expert_tokens", "raycake_moe_drop_rate", "raycake_moe_imbalance")
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


class MoEProbe:
    """An engine stepped the way an instance's EngineLoop steps it, recording after each step."""

    def __init__(self, model_dir: str) -> None:
        moe = MoEConfig(router="switch", capacity_factor=0.5)
        self.engine = LLMEngine(EngineConfig(model=model_dir, moe=moe))
        # A window longer than the test: the gauges keep the first step's load.
        self.metrics = InstanceMetrics(INSTANCE, moe_window_s=3600.0)

    def run(self, prompts: list[list[int]]) -> dict[int, MoEStats]:
        """Serve the prompts; return the load of the first step (what the gauges show)."""
        for prompt in prompts:
            self.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=3))
        self.engine.step()
        self.metrics.record(self.engine)
        first_step = self.engine.moe_stats()
        while self.engine.has_unfinished_requests():
            self.engine.step()
            self.metrics.record(self.engine)
        return first_step


def _samples(text: str, name: str) -> dict[tuple[str, ...], float]:
    """This instance's samples of one series: (layer[, expert]) -> value."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != f"ray_{name}":
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.get("instance") == INSTANCE:
            key = (labels["layer"], labels["expert"]) if "expert" in labels else (labels["layer"],)
            out[key] = float(match.group(3))
    return out


def test_moe_gauges_export_the_engines_expert_load(ray_session, tmp_path):  # noqa: F811
    port = os.environ.get(METRICS_PORT_ENV)
    if port is None:
        pytest.skip("Ray was started by another fixture, without a metrics export port")
    ray = ray_session
    build_mixtral_checkpoint(tmp_path, 4)
    probe = ray.remote(MoEProbe).remote(str(tmp_path))
    try:
        first_step = ray.get(probe.run.remote([list(range(2, 40)), list(range(50, 70))]))
        deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            samples = {name: _samples(text, name) for name in MOE_SERIES}
            if all(samples.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        ray.kill(probe)
    for name in MOE_SERIES:
        assert f"# TYPE ray_{name} gauge" in text, name
    assert sorted(first_step) == [0, 1]
    assert any(stats.num_dropped for stats in first_step.values())  # 58 tokens at capacity 8
    for layer, stats in first_step.items():
        for expert, tokens in enumerate(stats.tokens_per_expert):
            assert samples["raycake_moe_expert_tokens"][(str(layer), str(expert))] == tokens
        assert samples["raycake_moe_drop_rate"][(str(layer),)] == pytest.approx(stats.drop_rate)
        assert samples["raycake_moe_imbalance"][(str(layer),)] == pytest.approx(stats.imbalance)
