"""Speculative-decoding tests run their models on one torch thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread, as the benchmarks run: on a shared 2-core machine two threads spin
    against each other and other jobs (many times slower, same results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
