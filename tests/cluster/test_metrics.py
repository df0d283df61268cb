"""raycake's series reach Ray's Prometheus export, which the dashboard's graphs read."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest

from raycake import SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from tests.ray_fixture import METRICS_PORT_ENV, ray_session  # noqa: F401 - the session fixture


def _scrape(port: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_ttft_and_queue_series_are_exported(ray_session):  # noqa: F811
    port = os.environ.get(METRICS_PORT_ENV)
    if port is None:
        pytest.skip("Ray was started by another fixture, without a metrics export port")
    cluster = Cluster.from_config(ClusterConfig(namespace="raycake-test-metrics"))
    try:
        cluster.generate(["def f():"], SamplingParams(temperature=0, max_tokens=4))
        wanted = (
            "ray_raycake_ttft_ms",
            "ray_raycake_queue_length",
            "ray_raycake_prompt_tokens",
            "ray_raycake_instances",
        )
        deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
        text = ""
        while time.monotonic() < deadline:
            text = _scrape(port)
            # Other deployments of the session export the instances gauge too: wait for ours.
            ours = 'namespace="raycake-test-metrics"' in text
            if ours and all(f"\n{name}" in text for name in wanted):
                break
            time.sleep(2)
    finally:
        cluster.shutdown()
    for name in wanted:
        assert f"# TYPE {name}" in text, name
    assert 'instance="prefill-0"' in text
    # The autoscaler's gauge: one running instance per role, none starting or draining.
    instances = {
        (_label(line, "role"), _label(line, "state")): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_raycake_instances{")
        and _label(line, "namespace") == "raycake-test-metrics"
    }
    assert instances[("prefill", "running")] == instances[("decode", "running")] == 1
    assert instances[("prefill", "draining")] == instances[("decode", "starting")] == 0


def _label(line: str, key: str) -> str:
    return line.split(f'{key}="', 1)[1].split('"', 1)[0]
