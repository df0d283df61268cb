"""The MoE load and speculation gauges reach Ray's Prometheus export with the engine's numbers."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from raycake.engine.config import EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.model.config import MoEConfig
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
        self.metrics = InstanceMetrics(INSTANCE, window_s=3600.0)

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


SPEC_INSTANCE = "spec-gauge-probe"


class SpecProbe:
    """The embedded model with its EAGLE head, publishing every step (window 0)."""

    def __init__(self) -> None:
        from raycake.assets import default_eagle_head_dir
        from raycake.engine.spec.config import SpeculativeConfig

        spec = SpeculativeConfig(draft_model=str(default_eagle_head_dir()), num_draft_tokens=4)
        self.engine = LLMEngine(EngineConfig(speculative=spec))
        self.metrics = InstanceMetrics(SPEC_INSTANCE, window_s=0.0)

    def run(self, prompt: str) -> dict[str, float]:
        """Serve the prompt; return what the gauges must show: the last window's values
        (for acceptance, the last window that verified drafts), and the policy's last choice."""
        self.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24))
        before = self.engine.spec_stats()
        last: dict[str, float] = {}
        while self.engine.has_unfinished_requests():
            self.engine.step()
            self.metrics.record(self.engine)
            now = self.engine.spec_stats()
            window = now.since(before)
            before = now
            # The draft share follows every window that spent time (a step that only runs
            # the target, or only catches the head up, counts); the acceptance gauges only
            # windows that verified drafts.
            if window.draft_seconds + window.target_seconds > 0:
                last["raycake_spec_draft_time_share"] = window.draft_time_share
            if window.num_verify_steps:
                last.update(
                    {
                        "raycake_spec_acceptance_length": window.mean_acceptance_length,
                        "raycake_spec_acceptance_rate": window.acceptance_rate,
                        "raycake_spec_estimated_speedup": window.estimated_speedup,
                    }
                )
        return {**last, **self.engine.spec_controller.metrics()}


def test_speculation_gauges_export_the_engines_numbers(ray_session):  # noqa: F811
    port = os.environ.get(METRICS_PORT_ENV)
    if port is None:
        pytest.skip("Ray was started by another fixture, without a metrics export port")
    ray = ray_session
    probe = ray.remote(SpecProbe).remote()
    try:
        want = ray.get(probe.run.remote("def parse(path):\n    with open(path) as f:\n"))
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            got = {}
            for line in text.splitlines():
                match = _SAMPLE.match(line)
                if match is None or not match.group(1).startswith("ray_raycake_spec_"):
                    continue
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
                if labels.get("instance") == SPEC_INSTANCE:
                    key = labels.get("field", match.group(1).removeprefix("ray_"))
                    got[key] = float(match.group(3))
            if set(got) >= set(want) or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        ray.kill(probe)
    assert want["raycake_spec_acceptance_length"] > 1.0  # the trained head gets drafts accepted
    assert want["spec_policy_speculating_steps"] > 0
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
