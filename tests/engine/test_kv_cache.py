"""KV block accounting and the prefix cache, on hand-built requests (no model)."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from raycake.engine.kv_cache import KVCacheManager, hash_block_tokens
from raycake.engine.request import Request
from raycake.engine.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
BS = 4  # block size in every test here


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """What the scheduler and runner do for a whole prompt: look up, allocate, compute, cache."""
    blocks, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request, request.num_computed_tokens)
    kv.check_invariants()
    return kv.block_ids(request.request_id)


def test_block_hash_chains_parent_and_tokens():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert len(first) == 16
    assert hash_block_tokens(None, [1, 2, 3, 4]) == first
    assert hash_block_tokens(None, [1, 2, 3, 5]) != first
    # Same tokens under different parents are different blocks.
    parent_a, parent_b = hash_block_tokens(None, [9] * 4), hash_block_tokens(None, [8] * 4)
    assert hash_block_tokens(parent_a, [1, 2, 3, 4]) != hash_block_tokens(parent_b, [1, 2, 3, 4])


def test_block_hash_is_blake2b_of_little_endian_int32_in_every_process():
    tokens = [1, 128000, 70000, 0]
    parent = hashlib.blake2b(struct.pack("<4i", *tokens), digest_size=16).digest()
    child = hashlib.blake2b(parent + struct.pack("<2i", 5, 6), digest_size=16).digest()
    assert hash_block_tokens(None, tokens) == parent
    assert hash_block_tokens(parent, [5, 6]) == child
    # Another interpreter, another hash salt, and torch blocked: the same key.
    # The stub package skips raycake/__init__.py, which imports the torch engine.
    code = (
        "import sys, types; sys.modules['torch'] = None; sys.modules['ray'] = None\n"
        f"pkg = types.ModuleType('raycake'); pkg.__path__ = [{str(REPO_ROOT / 'raycake')!r}]\n"
        "sys.modules['raycake'] = pkg\n"
        "from raycake.engine.kv_cache import hash_block_tokens\n"
        f"print(hash_block_tokens(hash_block_tokens(None, {tokens}), [5, 6]).hex())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == child.hex()


def test_block_hashes_cover_full_blocks_only_and_grow_incrementally():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", list(range(10)))
    kv.update_block_hashes(request)
    assert len(request.block_hashes) == 2  # 10 tokens: two full blocks
    first_two = list(request.block_hashes)
    for token in (10, 11):
        request.append_output_token(token)
    kv.update_block_hashes(request)
    assert request.block_hashes[:2] == first_two
    assert request.block_hashes[2] == hash_block_tokens(first_two[1], [8, 9, 10, 11])


def test_second_request_reuses_the_cached_prefix_and_counts_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    blocks_a = admit(kv, a)
    assert blocks_a == [0, 1, 2]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)

    b = make_request("b", [*range(8), 99, 98, 97])  # shares a's two full blocks
    blocks_b = admit(kv, b)
    assert blocks_b[:2] == [0, 1] and blocks_b[2] not in blocks_a
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (21, 8)
    assert kv.usage == 4 / 8

    kv.free(a)
    kv.check_invariants()
    assert kv.num_free_blocks == 5  # blocks 0 and 1 are still held by b
    kv.free(b)
    kv.check_invariants()
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    # Free but still cached: a third request finds the prefix.
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    # Two full cached blocks, but the last token must run to produce logits.
    assert kv.get_computed_blocks(make_request("b", list(range(8)))) == ([0], 4)
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)


def test_least_recently_freed_cached_block_is_reused_first_tail_before_head():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(100, 108)))
    assert admit(kv, a) == [0, 1]
    assert admit(kv, b) == [2, 3]
    kv.free(a)  # policy order: 1, 0 (a's tail first)
    kv.free(b)  # then 3, 2
    kv.check_invariants()
    c = make_request("c", list(range(200, 206)))
    assert kv.allocate_slots(c, 6) == [1, 0]
    kv.check_invariants()
    # a's blocks were evicted: their hashes are gone from the prefix cache; b's remain.
    assert kv.get_computed_blocks(make_request("a2", list(range(9)))) == ([], 0)
    assert kv.get_computed_blocks(make_request("b2", list(range(100, 109)))) == ([2, 3], 8)


def test_a_hit_takes_the_block_back_from_the_free_pool():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)))
    blocks, num_cached = kv.get_computed_blocks(b)
    # Needs 3 blocks: the two cached (free) ones plus one fresh, which must not evict them.
    assert kv.allocate_slots(b, 9 - num_cached, blocks) == [0, 1, 2]
    assert kv.num_free_blocks == 1
    kv.check_invariants()


def test_failed_allocation_has_no_side_effects():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(20)))
    blocks, num_cached = kv.get_computed_blocks(b)
    assert (blocks, num_cached) == ([0, 1], 8)
    before = (kv.num_free_blocks, kv.request_ids, list(kv._ref_counts), dict(kv._cached))
    assert kv.allocate_slots(b, 12, blocks) is None  # needs 5 blocks, the pool has 4
    assert (kv.num_free_blocks, kv.request_ids, list(kv._ref_counts), dict(kv._cached)) == before
    assert 0 in kv._free and 1 in kv._free
    kv.check_invariants()
    # The same request fits with a smaller chunk.
    assert kv.allocate_slots(b, 4, blocks) == [0, 1, 2]


def test_allocation_grows_the_table_only_at_block_boundaries():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = make_request("r", list(range(3)))
    assert kv.allocate_slots(r, 3) == [0]
    r.num_computed_tokens = 3
    r.append_output_token(7)
    assert kv.allocate_slots(r, 1) == []  # the 4th token still fits in block 0
    r.num_computed_tokens = 4
    r.append_output_token(8)
    assert kv.allocate_slots(r, 1) == [1]
    assert kv.block_ids("r") == [0, 1]
    kv.check_invariants()


def test_concurrent_duplicates_keep_the_first_registration():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(6)))
    # Both admitted before either computed: no hit for b, so it gets its own copy.
    for r in (a, b):
        assert kv.get_computed_blocks(r) == ([], 0)
        kv.allocate_slots(r, 6)
    for r in (a, b):
        r.num_computed_tokens = 6
        kv.cache_full_blocks(r, 6)
    kv.check_invariants()
    assert kv.block_ids("a")[0] == 0 and kv.block_ids("b")[0] == 2
    assert kv.get_computed_blocks(make_request("c", list(range(6)))) == ([0], 4)
    kv.free(a)
    kv.free(b)
    kv.check_invariants()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(8))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv._cached == {}


def test_reset_prefix_cache_forgets_every_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    kv.reset_prefix_cache()
    kv.check_invariants()
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    kv.free(a)
    kv.check_invariants()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda kv: kv._ref_counts.__setitem__(0, 2), "block 0: ref count 2 but held by 1"),
        (lambda kv: kv._tables["a"].append(0), "blocks \\[0\\] appear twice"),
        (lambda kv: kv._free.add(1), "block 1: ref count 1 but free"),
        (lambda kv: kv._cached.__setitem__(b"x" * 16, 3), "maps 7878"),
    ],
)
def test_invariant_checks_name_the_broken_block(corrupt, message):
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    corrupt(kv)
    with pytest.raises(AssertionError, match=message):
        kv.check_invariants()
