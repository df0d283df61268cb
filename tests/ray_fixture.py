"""One local Ray cluster per test session, shared by every test package that needs Ray."""

from __future__ import annotations

import os
import socket

import pytest

# Where the session's Prometheus metrics are exported (set when this fixture started Ray).
METRICS_PORT_ENV = "RAYCAKE_TEST_METRICS_PORT"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        # 2 cores here: over-subscribe logical CPUs so every actor can be placed.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        ray.init(
            num_cpus=16, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port
        )
        os.environ[METRICS_PORT_ENV] = str(port)
        started = True
    yield ray
    if started:
        ray.shutdown()
