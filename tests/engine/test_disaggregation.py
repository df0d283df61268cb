"""Prefill in one engine, decode in another, no Ray: the handoff changes no token."""

from __future__ import annotations

from dataclasses import replace

import pytest

from raycake.engine.config import CacheConfig, EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.scheduler import RequestRejected
from tests.llama_checkpoints import CONFIGS, build_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("disagg-model")
    build_checkpoint(CONFIGS[2], out)
    return str(out)


def _engine(model_dir: str, **cache) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, cache=CacheConfig(block_size=4, **cache)))


def _run(engine: LLMEngine, rid: str) -> list[int]:
    while engine.is_unfinished(rid):
        engine.step()
    return engine.pop_finished(rid).token_ids


def _prefill(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    rid = engine.add_request(prompt, replace(params, max_tokens=1), hold_kv=True)
    first = _run(engine, rid)
    exported = engine.export_kv(rid)
    engine.release_kv(rid)
    engine.scheduler.check_invariants()
    return first[0], exported


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_prefill_then_decode_matches_one_engine(model_dir, params):
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 30)]
    single = _engine(model_dir)
    expected = [_run(single, single.add_request(p, params)) for p in prompts]

    prefill, decode = _engine(model_dir), _engine(model_dir)
    for i, prompt in enumerate(prompts):
        first, exported = _prefill(prefill, prompt, params)
        assert exported.num_tokens == len(prompt)
        assert exported.kv.shape[2] == -(-len(prompt) // 4)
        assert len(exported.block_hashes) == len(prompt) // 4
        assert decode.add_prefilled_request(f"d{i}", prompt, first, params, exported.kv)
    outputs = [_run(decode, f"d{i}") for i in range(len(prompts))]
    assert outputs == expected
    assert prefill.scheduler.kv_cache.usage == 0.0  # every held block was released
    decode.scheduler.check_invariants()


def test_imported_prefix_blocks_are_prefix_cache_hits(model_dir):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    shared = list(range(10, 31))  # 21 tokens: 5 full blocks of 4
    source = _engine(model_dir)
    _, exported = _prefill(source, shared, params)
    full = len(exported.block_hashes)
    fetched = exported.kv[:, :, :full]

    target = _engine(model_dir)
    assert target.import_prefix_blocks(exported.block_hashes, fetched) == full
    assert target.num_cached_prefix_blocks(exported.block_hashes) == full
    assert target.import_prefix_blocks(exported.block_hashes, fetched) == 0  # already there
    rid = target.add_request([*shared, 99], params)
    tokens = _run(target, rid)
    reference = _engine(model_dir)
    assert tokens == _run(reference, reference.add_request([*shared, 99], params))
    # The target computed only what the imported blocks did not cover.
    assert target.stats().prefix_cache_hits == full * 4
    target.scheduler.check_invariants()


def test_handoff_waits_when_the_decode_pool_is_full(model_dir):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prefill = _engine(model_dir)
    first, exported = _prefill(prefill, list(range(40)), params)
    # 40 tokens + 4 to generate need 11 blocks of 4: 12 hold one such request at a time.
    decode = _engine(model_dir, num_blocks=12)
    assert decode.add_prefilled_request("a", list(range(40)), first, params, exported.kv)
    assert not decode.add_prefilled_request("x", list(range(40)), first, params, exported.kv)
    assert decode.unfinished_request_ids() == ["a"]
    decode.scheduler.check_invariants()
    # A pool that could never hold it refuses at once instead of letting the caller wait.
    tiny = _engine(model_dir, num_blocks=8)
    with pytest.raises(RequestRejected, match=r"max_tokens: .* needs 11 KV blocks"):
        tiny.add_prefilled_request("x", list(range(40)), first, params, exported.kv)
    assert not tiny.has_unfinished_requests()
    tiny.scheduler.check_invariants()
    bad = exported.kv[:, :, :2]
    roomy = _engine(model_dir)
    with pytest.raises(ValueError, match="kv: expected shape"):
        roomy.add_prefilled_request("y", list(range(40)), first, params, bad)
    assert not roomy.has_unfinished_requests()
    roomy.scheduler.check_invariants()
