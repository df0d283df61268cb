"""Titans MAG through the cluster: the memory state after the prompt travels from the prefill
instance to the decode instance with the KV, and the KV store keeps the snapshot at a prompt's
last memory-chunk boundary with its block, so a later prompt sharing that prefix starts from it.
Greedy outputs equal a single in-process engine's."""

from __future__ import annotations

import pytest
import ray
import torch

from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from raycake.engine.config import CacheConfig, EngineConfig
from raycake.engine.kv_cache import block_hashes_for
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from tests.llama_checkpoints import build_raycake_checkpoint, tiny_titans_config
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# The tiny model's window is 12 tokens and its memory chunk 8 (two blocks of 4): prompts end
# inside the first chunk, past the window, on a boundary (no pending rows) and well beyond.
PROMPT_LENGTHS = (5, 13, 16, 27)


def _prompt(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def titans(ray_session, tmp_path_factory):  # noqa: F811
    """(cluster, engine config): 1 prefill, 1 decode, 1 store shard over the tiny Titans
    model; the session's Ray cluster, a namespace of its own."""
    out = tmp_path_factory.mktemp("titans-cluster-model")
    build_raycake_checkpoint(tiny_titans_config(), out, seed=1, with_tokenizer=True)
    # Small pools: allocating the default budgets costs more than serving these prompts.
    cache = CacheConfig(block_size=4, num_blocks=256, memory_state_bytes=2**20)
    engine = EngineConfig(model=str(out), cache=cache)
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace="raycake-test-titans",
            engine=engine,
            num_store_shards=1,
            actor_max_restarts=0,
        )
    )
    yield cluster, engine
    cluster.shutdown()


def _single_engine(engine: EngineConfig, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLMEngine(engine)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    while llm.has_unfinished_requests():
        llm.step()
    return [llm.pop_finished(rid).token_ids for rid in ids]


def test_outputs_match_a_single_engine(titans):
    cluster, engine = titans
    prompts = [_prompt(100 + i, n) for i, n in enumerate(PROMPT_LENGTHS)]
    outputs = cluster.generate(prompts, GREEDY)
    assert [o.finish_reason for o in outputs] == ["length"] * len(prompts), outputs
    assert [o.token_ids for o in outputs] == _single_engine(engine, prompts)


def test_the_store_keeps_the_snapshot_and_a_shared_prefix_starts_from_it(titans):
    cluster, engine = titans
    first = _prompt(1, 21)  # last chunk boundary: 16 tokens, the end of block 4
    second = first[:16] + _prompt(2, 9)
    cluster.generate([first], GREEDY)
    # Waits for the prefill's store publish, then drops its local cache: the prefix can only
    # come back from the store.
    cluster.reset_prefix_cache()
    boundary_hash = block_hashes_for(first, 4)[16 // 4 - 1]
    [shard] = cluster.store_shards
    assert ray.get(shard.contains.remote([boundary_hash], with_state=True)) == [True]

    out = cluster.generate([second], GREEDY)[0]
    assert out.finish_reason == "length"
    assert out.num_store_blocks >= 4
    assert out.num_cached_tokens == 16  # the snapshot came with the blocks: a Titans hit
    assert out.token_ids == _single_engine(engine, [second])[0]
