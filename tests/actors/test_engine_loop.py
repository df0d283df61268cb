"""EngineLoop without Ray: the engine steps on its own thread, so the event loop stays free while a
step runs; a caller that goes away frees its blocks; a step that raises fails only its requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from raycake.actors.engine_loop import EngineLoop, EngineStepError
from raycake.engine.config import CacheConfig, EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from tests.llama_checkpoints import CONFIGS, build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("engine-loop-model")
    build_checkpoint(CONFIGS[1], out)
    return str(out)


def _engine(model_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, cache=CacheConfig(block_size=4, num_blocks=64)))


async def _stream(loop: EngineLoop, engine: LLMEngine, rid: str, prompt: list[int]) -> list[int]:
    queue = loop.subscribe(rid)
    await loop.call(engine.add_request, prompt, GREEDY, request_id=rid)
    tokens: list[int] = []
    while True:
        delta = await queue.get()
        if isinstance(delta, BaseException):
            raise delta
        tokens += delta.token_ids
        if delta.finished:
            return tokens


def test_the_event_loop_runs_while_a_step_is_held(model_dir):
    """A step blocked on purpose: pings (coroutines on the loop) still complete meanwhile."""
    engine = _engine(model_dir)
    in_step, release = threading.Event(), threading.Event()
    original = engine.step
    held = {}  # the thread the held step ran on, and whether it was released (not timed out)

    def held_step():
        if not in_step.is_set():
            held["thread"] = threading.get_ident()
            in_step.set()
            held["released"] = release.wait(timeout=30)
        return original()

    engine.step = held_step

    async def scenario() -> tuple[int, list[int]]:
        loop = EngineLoop(engine)
        held["loop_thread"] = threading.get_ident()
        request = asyncio.ensure_future(_stream(loop, engine, "a", [5, 6, 7, 8, 9]))
        await asyncio.to_thread(in_step.wait, 30)
        pings = 0
        for _ in range(20):  # the loop turns while the engine thread sits inside step()
            await asyncio.sleep(0.001)
            pings += 1
        release.set()
        tokens = await asyncio.wait_for(request, 60)
        await loop.stop()
        return pings, tokens

    pings, tokens = asyncio.run(scenario())
    assert pings == 20
    # Had the step blocked the loop, the pings could only have run after it timed out.
    assert held["released"] is True
    assert held["thread"] != held["loop_thread"]
    assert len(tokens) == GREEDY.max_tokens


def test_a_caller_that_goes_away_frees_its_blocks(model_dir):
    engine = _engine(model_dir)
    free_before = engine.scheduler.kv_cache.num_free_blocks

    async def scenario() -> tuple[int, int]:
        loop = EngineLoop(engine)
        queue = loop.subscribe("gone")
        await loop.call(engine.add_request, list(range(3, 40)), GREEDY, request_id="gone")
        delta = await queue.get()  # it runs and holds blocks...
        assert not isinstance(delta, BaseException) and not delta.finished
        held = await loop.call(lambda: engine.scheduler.kv_cache.num_free_blocks)
        await loop.unsubscribe("gone")  # ...and its caller leaves
        free = await loop.call(lambda: engine.scheduler.kv_cache.num_free_blocks)
        unfinished = await loop.call(engine.unfinished_request_ids)
        await loop.stop()
        assert unfinished == []
        return held, free

    held, free = asyncio.run(scenario())
    assert held < free_before
    assert free == free_before
    engine.scheduler.kv_cache.check_invariants()


def test_a_step_that_raises_fails_its_requests_and_the_engine_serves_on(model_dir):
    engine = _engine(model_dir)
    original = engine.step
    raised = []

    def faulty_step():  # fails once, in the first step that holds both requests
        if not raised and len(engine.unfinished_request_ids()) == 2:
            raised.append(True)
            raise RuntimeError("device lost")
        return original()

    engine.step = faulty_step
    free_before = engine.scheduler.kv_cache.num_free_blocks

    async def scenario():
        loop = EngineLoop(engine)
        results = await asyncio.gather(
            _stream(loop, engine, "x", [5, 6, 7]),
            _stream(loop, engine, "y", [9, 10, 11]),
            return_exceptions=True,
        )
        after = await _stream(loop, engine, "z", [5, 6, 7])
        free = await loop.call(lambda: engine.scheduler.kv_cache.num_free_blocks)
        await loop.stop()
        return results, after, free

    results, after, free = asyncio.run(scenario())
    assert all(isinstance(r, EngineStepError) for r in results)
    assert "device lost" in str(results[0])
    assert len(after) == GREEDY.max_tokens
    assert free == free_before
