"""Titans memory states leave one engine and enter another the way the instance actors move
them, without Ray: after a prompt with its KV (wire version 3), and as store snapshots that
ride on the block ending at a memory-chunk boundary (``PrefillInstance``'s store helpers)."""

from __future__ import annotations

import pytest
import torch

from raycake.actors.prefill import _pack_blocks, _unpack_blocks
from raycake.engine.config import CacheConfig, EngineConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.state_cache import MemoryStateCache
from raycake.transfer.wire import KVBlockHeader, pack_kv, unpack_payload
from tests.llama_checkpoints import build_raycake_checkpoint, tiny_titans_config

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
CHUNK, BLOCK = 8, 4  # tiny_titans_config's memory chunk; block_size must divide it


def _prompt(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("titans-snapshots")
    build_raycake_checkpoint(tiny_titans_config(), out, seed=1, with_tokenizer=True)
    return str(out)


def _engine(model_dir: str) -> LLMEngine:
    # Small pools: the default budgets take longer to allocate than these tests take to run.
    cache = CacheConfig(block_size=BLOCK, num_blocks=256, memory_state_bytes=2**20)
    return LLMEngine(EngineConfig(model=model_dir, cache=cache))


def _run(engine: LLMEngine, prompt: list[int], params: SamplingParams = GREEDY, **kwargs):
    rid = engine.add_request(prompt, params, **kwargs)
    while engine.is_unfinished(rid):
        engine.step()
    return rid, engine.pop_finished(rid)


def test_the_state_after_the_prompt_travels_with_the_kv(model_dir):
    """Prefill in one engine, the payload through bytes, decode in another: the same tokens as
    one engine, for prompts ending before a chunk boundary, on one, and past the window."""
    prefill, decode, single = _engine(model_dir), _engine(model_dir), _engine(model_dir)
    for i, n in enumerate((5, 16, 27)):
        prompt = _prompt(10 + i, n)
        rid, first = _run(
            prefill, prompt, SamplingParams(temperature=0, max_tokens=1), hold_kv=True
        )
        exported = prefill.export_kv(rid)
        prefill.release_kv(rid)
        header, payload = pack_kv(
            exported.kv,
            exported.block_hashes,
            exported.num_tokens,
            with_checksum=True,
            memory_state=exported.memory_state,
        )
        fetched = unpack_payload(KVBlockHeader.from_msgpack(header.to_msgpack()), payload.tobytes())
        assert list(fetched.memory_state) == list(exported.memory_state)
        assert fetched.memory_state[f"layers.{_memory_layer(decode)}.pending"].shape[0] == n % CHUNK
        added = decode.add_prefilled_request(
            f"d{i}",
            prompt,
            first.token_ids[0],
            GREEDY,
            fetched.kv,
            block_hashes=list(header.block_hashes),
            memory_state=fetched.memory_state,
        )
        assert added
        while decode.is_unfinished(f"d{i}"):
            decode.step()
        assert decode.pop_finished(f"d{i}").token_ids == _run(single, prompt)[1].token_ids, n


def _memory_layer(engine: LLMEngine) -> int:
    return next(iter(engine.runner.memory_pool.layers))


def test_a_store_snapshot_makes_the_prefix_a_hit(model_dir):
    """Engine A's prompt: its blocks and the snapshot at its last boundary (16 of 21 tokens)
    through the store's wire format into engine B, whose next prompt sharing those 16 tokens
    starts from there and still matches an engine that computed everything."""
    first = _prompt(1, 21)
    second = first[:16] + _prompt(2, 9)
    a = _engine(model_dir)
    rid, _ = _run(a, first, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
    block_hash, tensors = a.export_memory_snapshot(rid)
    exported = a.export_kv(rid)
    a.release_kv(rid)
    hashes = exported.block_hashes
    assert block_hash == hashes[16 // BLOCK - 1]
    assert tensors[f"layers.{_memory_layer(a)}.pending"].shape[0] == 0  # a boundary: none
    index = hashes.index(block_hash)
    blocks = _pack_blocks(exported.kv, hashes, list(range(len(hashes))), {index: tensors})
    versions = [KVBlockHeader.from_msgpack(header).version for _, header, _ in blocks]
    assert versions == [3 if i == index else 1 for i in range(len(hashes))]

    # What a store read hands the instance: (header, payload) of each block of the run.
    run = hashes[: index + 1]
    kv, snapshots = _unpack_blocks(run, [(h, p) for _, h, p in blocks[: index + 1]])
    assert list(snapshots) == [index]

    without = _engine(model_dir)
    assert without.import_prefix_blocks(run, kv) == len(run)
    _, plain = _run(without, second)
    assert plain.num_cached_tokens == 0  # KV alone is no hit for Titans: no state to start from

    b = _engine(model_dir)
    assert b.import_prefix_blocks(run, kv) == len(run)
    assert b.import_memory_snapshot(block_hash, snapshots[index])
    assert not b.import_memory_snapshot(block_hash, snapshots[index])  # already there
    _, hit = _run(b, second)
    b.scheduler.check_invariants()
    assert hit.num_cached_tokens == 16
    assert hit.token_ids == plain.token_ids  # ``without`` computed every token


def test_import_memory_snapshot_checks_before_taking_a_slot(model_dir):
    engine = _engine(model_dir)
    rid, _ = _run(engine, _prompt(3, 9), SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
    block_hash, tensors = engine.export_memory_snapshot(rid)
    engine.release_kv(rid)
    layer = _memory_layer(engine)
    fresh = _engine(model_dir)
    free = fresh.scheduler.memory_states.num_free_slots
    with_rows = {**tensors, f"layers.{layer}.pending": torch.zeros(1, 32)}
    poisoned = {
        **tensors,
        f"layers.{layer}.weights.0": tensors[f"layers.{layer}.weights.0"] * torch.nan,
    }
    cases = [
        (b"short", tensors, "^block_hash"),
        (block_hash, with_rows, r"^memory_state\[.*pending.*\]: expected shape"),
        (block_hash, poisoned, "NaN"),
        (block_hash, {k: v for k, v in tensors.items() if "momentum" not in k}, "missing"),
    ]
    for bad_hash, bad_tensors, match in cases:
        with pytest.raises(ValueError, match=match):
            fresh.import_memory_snapshot(bad_hash, bad_tensors)
    assert fresh.scheduler.memory_states.num_free_slots == free
    assert fresh.scheduler.memory_states.find_snapshot([b"x" * 16, block_hash], 2) == (None, 0)


def test_memory_state_cache_imports_a_snapshot_into_a_free_slot():
    cache = MemoryStateCache(num_slots=2, block_size=4, chunk_size=8)
    hashes = [bytes([i]) * 16 for i in range(4)]
    slot = cache.import_snapshot(hashes[1])
    assert slot is not None and cache.num_free_slots == 2  # a snapshot stays in the free pool
    assert cache.find_snapshot(hashes, 4) == (slot, 2)
    assert cache.import_snapshot(hashes[1]) is None  # already registered
    cache.check_invariants()
    cache.allocate("a")
    cache.allocate("b")  # hands out the snapshot slot last (least recently used first)
    assert cache.find_snapshot(hashes, 4) == (None, 0)
    assert cache.import_snapshot(hashes[3]) is None  # no free slot
    cache.check_invariants()
    off = MemoryStateCache(num_slots=1, block_size=4, chunk_size=8, enable_prefix_caching=False)
    assert off.import_snapshot(hashes[1]) is None
