"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session."""

from __future__ import annotations

import pytest

from tests.llama_checkpoints import CONFIGS, TinyLlama, build_checkpoint


@pytest.fixture(scope="session", params=CONFIGS, ids=lambda spec: spec.name)
def tiny_llama(request, tmp_path_factory):
    """(checkpoint folder, transformers model) for each parity configuration."""
    spec: TinyLlama = request.param
    out_dir = tmp_path_factory.mktemp(spec.name)
    return out_dir, build_checkpoint(spec, out_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``stops_ray`` end every Ray process on the machine (``ray stop --force``):
    they run after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("stops_ray") is not None)
