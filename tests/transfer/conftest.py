"""One local Ray cluster for the whole test session, shared with any other package's tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """Start Ray once (or reuse a cluster another fixture started); shut down only our own."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    if started_here and ray.is_initialized():
        ray.shutdown()
