"""Every tensor the step path builds is built on the engine's device.

A tensor created without ``device=`` lands on the CPU (or the default device): on an
accelerator it fails in the first op that mixes it with the model's tensors, or costs a copy
every step. These tests run real engine steps (plain decode, chunked prefill, prefix-cache hits,
seeded and unseeded sampling, EAGLE drafting and verification, the KV and feature hand-off)
under a ``TorchFunctionMode`` that records every factory call made from raycake's code without
an explicit device, so they fail on the CPU machines the suite runs on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import raycake
from raycake.engine import runner as runner_module
from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from tests.llama_checkpoints import CONFIGS, build_checkpoint

RAYCAKE_DIR = str(Path(raycake.__file__).parent)
TORCH_DIR = str(Path(torch.__file__).parent)
# Factories that may be called on an existing tensor, whose device they keep.
_KEEP_DEVICE = {torch.as_tensor, torch.asarray}


class DevicelessFactories(TorchFunctionMode):
    """Records ``"<factory> at <file>:<line>"`` for each tensor factory (torch.zeros, arange,
    tensor, ...) that raycake code calls without an explicit device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._factories and kwargs.get("device") is None:
            keeps = func in _KEEP_DEVICE and args and isinstance(args[0], torch.Tensor)
            caller = None if keeps else _raycake_caller()
            if caller is not None:
                self.calls.append(f"{func.__name__} at {caller}")
        return func(*args, **kwargs)


def _raycake_caller() -> str | None:
    """The raycake line that called the factory, or None when the first caller outside torch
    (and this module) is not raycake's (e.g. a test building its inputs)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and not path.startswith(TORCH_DIR):
            if not path.startswith(RAYCAKE_DIR):
                return None
            return f"{Path(path).relative_to(Path(RAYCAKE_DIR).parent)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _recorded(fn: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        mode = DevicelessFactories()
        with mode:
            result = fn(*args, **kwargs)
        calls.extend(mode.calls)
        return result

    return wrapped


def _watch(engine: LLMEngine, calls: list[str]) -> None:
    """Record device-less factories in every engine method that builds tensors: the step,
    and the KV (and features) leaving and entering an engine."""
    for name in ("step", "export_kv", "add_prefilled_request", "import_prefix_blocks"):
        setattr(engine, name, _recorded(getattr(engine, name), calls))


def _run(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("device-model")
    build_checkpoint(CONFIGS[1], out)
    return str(out)


def _plain_engine(model: str) -> LLMEngine:
    # Small chunks and budget: prompts prefill in several chunks, beside running decodes.
    return LLMEngine(
        EngineConfig(
            model=model,
            cache=CacheConfig(block_size=4, num_blocks=64),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=12, max_num_seqs=4, max_prefill_chunk=8
            ),
        )
    )


def _exercise_plain_paths(engine: LLMEngine) -> None:
    shared = list(range(3, 23))  # 20 tokens: 5 full blocks, later a prefix-cache hit
    engine.add_request([*shared, 40], SamplingParams(temperature=0, max_tokens=6))
    engine.add_request([7, 8, 9], SamplingParams(temperature=0.9, top_k=10, max_tokens=5))
    engine.add_request([11, 12], SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=7))
    _run(engine)
    # The shared prefix is cached now: the new request starts mid-prompt (a masked chunk).
    engine.add_request([*shared, 41, 42], SamplingParams(temperature=0, max_tokens=4))
    _run(engine)
    assert engine.stats().prefix_cache_hits >= 20


def test_plain_steps_build_every_tensor_on_the_engine_device(tiny_model):
    engine = _plain_engine(tiny_model)
    calls: list[str] = []
    _watch(engine, calls)
    _exercise_plain_paths(engine)
    assert calls == []


def test_a_deviceless_factory_in_the_runner_is_caught(tiny_model, monkeypatch):
    """The check is live: the pre-fix ``_additive_mask`` (torch.zeros without a device),
    compiled as runner code, is reported with its place."""
    source = (
        "def _additive_mask(blocked, dtype):\n"
        "    return torch.zeros(blocked.shape, dtype=dtype).masked_fill_(blocked, "
        "float('-inf'))\n"
    )
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(source, runner_module.__file__, "exec"), namespace)
    monkeypatch.setattr(runner_module, "_additive_mask", namespace["_additive_mask"])
    engine = _plain_engine(tiny_model)
    calls: list[str] = []
    _watch(engine, calls)
    _exercise_plain_paths(engine)
    assert calls and set(calls) == {"zeros at raycake/engine/runner.py:2"}


@pytest.fixture(scope="module")
def eagle_engines() -> tuple[LLMEngine, LLMEngine]:
    """Two engines on the embedded model with its EAGLE head: a prefill and a decode one."""

    def build() -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model="default",
                cache=CacheConfig(block_size=16, num_blocks=64),
                scheduler=SchedulerConfig(max_num_batched_tokens=64, max_prefill_chunk=24),
                speculative=SpeculativeConfig(draft_model="default", num_draft_tokens=8),
            )
        )

    return build(), build()


def test_eagle_steps_and_the_handoff_build_every_tensor_on_the_engine_device(eagle_engines):
    prefill, decode = eagle_engines
    calls: list[str] = []
    _watch(prefill, calls)
    _watch(decode, calls)
    code = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=20, ignore_eos=True)
    # Two verify spans of the same size batch into one attention call (the span plan).
    prefill.add_request(code, greedy)
    prefill.add_request("class Point:\n    def __init__(self, x, y):\n", sampled)
    _run(prefill)
    # A prefix-cache hit, then the prompt's KV and features leave for the decode engine.
    rid = prefill.add_request(code + " + fib", replace(greedy, max_tokens=1), hold_kv=True)
    _run(prefill)
    first = prefill.pop_finished(rid).token_ids[0]
    exported = prefill.export_kv(rid)
    prefill.release_kv(rid)
    assert exported.features is not None
    prompt = prefill.tokenizer.encode(code + " + fib")
    full = exported.kv.shape[2] - (1 if len(prompt) % 16 else 0)
    decode.import_prefix_blocks(exported.block_hashes[:full], exported.kv[:, :, :full])
    assert decode.add_prefilled_request(
        "d", prompt, first, greedy, exported.kv, features=exported.features
    )
    _run(decode)
    stats = prefill.spec_stats()
    assert stats.num_verify_steps > 0 and stats.num_accepted_tokens > 0
    assert decode.spec_stats().num_accepted_tokens > 0
    assert calls == []
