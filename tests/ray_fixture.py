"""One local Ray cluster per test session, shared by every test package that needs Ray."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        # 2 cores here: over-subscribe logical CPUs so every actor can be placed.
        ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR")
        started = True
    yield ray
    if started:
        ray.shutdown()
