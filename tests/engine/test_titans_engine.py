"""Titans MAG served by the paged engine: its memory state is cache state.

The reference is the model's own training path (whole sequences, dense windowed attention, the
memory run over the whole sequence from its initial state), re-run over the full sequence for
every greedy token. The engine must produce the same tokens however requests are batched,
chunked, preempted, resumed from a cached state or handed from one engine to another.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.memory_state import memory_state_bytes_per_slot
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from raycake.model.loader import load_model
from tests.llama_checkpoints import (
    build_raycake_checkpoint,
    tiny_titans_config,
    training_path_greedy,
)

GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
# Lengths around the window (12), the memory chunk (8) and the block (4).
PROMPT_LENGTHS = (3, 8, 13, 21, 40, 57)


def _prompt(i: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randint(2, 320, (n,), generator=gen).tolist()


PROMPTS = [_prompt(i, n) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("titans-model")
    build_raycake_checkpoint(tiny_titans_config(), out, seed=1, with_tokenizer=True)
    return str(out)


def _engine(model_dir: str, cache: dict | None = None, **scheduler) -> LLMEngine:
    cache_config = CacheConfig(block_size=4, **{"num_blocks": 160, **(cache or {})})
    return LLMEngine(
        EngineConfig(model=model_dir, cache=cache_config, scheduler=SchedulerConfig(**scheduler))
    )


def _run_all(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
        engine.scheduler.check_invariants()
    return [engine.pop_finished(rid).token_ids for rid in ids]


@torch.inference_mode()
def _reference(
    model_dir: str, prompt: list[int], max_tokens: int, with_memory: bool = True
) -> list[int]:
    model = load_model(model_dir)
    if not with_memory:  # the memory branch (and its gate) removed from every layer
        for layer in model.model.layers:
            layer.memory = None
    return training_path_greedy(model, prompt, max_tokens)


def test_engine_matches_the_training_path(model_dir):
    prompts = PROMPTS[3:]  # beyond the window and several memory chunks
    outputs = _run_all(_engine(model_dir), prompts)
    expected = [_reference(model_dir, p, GREEDY.max_tokens) for p in prompts]
    assert outputs == expected
    # The reference depends on the memory: without it, the tokens differ.
    without = [_reference(model_dir, p, GREEDY.max_tokens, with_memory=False) for p in prompts]
    assert without != expected


def test_blocks_behind_the_window_are_released(model_dir):
    engine = _engine(model_dir)
    rid = engine.add_request(PROMPTS[5], GREEDY)  # 57 tokens, then 14 more
    held = []
    engine.step()  # the whole prompt
    while engine.is_unfinished(rid):
        held.append(engine.scheduler.kv_cache.num_held_blocks(rid))
        engine.step()
        engine.scheduler.check_invariants()
    # After each step the request holds the blocks of the window of its next token (12
    # tokens: at most 4 blocks of 4) and that token's block: flat, whatever the context, where
    # a dense model holds every block (15 after the prompt, 18 at the end).
    assert len(held) == GREEDY.max_tokens - 1
    assert max(held) <= 5


def test_batched_chunked_and_alone_are_the_same(model_dir):
    alone = [_run_all(_engine(model_dir), [p])[0] for p in PROMPTS]
    batched = _run_all(_engine(model_dir), PROMPTS)
    # Prefill in chunks of 5 tokens (not aligned to blocks or memory chunks), mixed with decodes.
    chunked = _run_all(
        _engine(model_dir, max_prefill_chunk=5, max_num_batched_tokens=16, max_num_seqs=4), PROMPTS
    )
    assert batched == alone
    assert chunked == alone


def test_memory_slots_bound_the_running_requests(model_dir):
    model = load_model(model_dir)
    per_slot = memory_state_bytes_per_slot(model.memories(), torch.float32)
    engine = _engine(model_dir, cache={"memory_state_bytes": 2 * per_slot + 1})
    assert engine.scheduler.memory_states.num_slots == 2
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    most_running = 0
    while engine.has_unfinished_requests():
        engine.step()
        most_running = max(most_running, engine.scheduler.num_running)
        engine.scheduler.check_invariants()
    assert most_running == 2
    outputs = [engine.pop_finished(rid).token_ids for rid in ids]
    assert outputs == _run_all(_engine(model_dir), PROMPTS)


def test_preempted_requests_resume_with_the_same_tokens(model_dir):
    # 20 blocks of 4 tokens (the least one 77-token request needs) cannot hold six requests
    # at once, even with blocks behind the window released: some are preempted.
    engine = _engine(
        model_dir,
        cache={"num_blocks": 20},
        max_prefill_chunk=4,
        max_num_batched_tokens=16,
        max_num_seqs=8,
    )
    outputs = _run_all(engine, PROMPTS)
    assert engine.scheduler.num_preemptions > 0
    assert outputs == _run_all(_engine(model_dir), PROMPTS)


def test_follow_up_turn_resumes_from_the_cached_state(model_dir):
    first_prompt = PROMPTS[4]  # 40 tokens
    engine = _engine(model_dir)
    [first] = _run_all(engine, [first_prompt])
    follow_up = first_prompt + first + _prompt(99, 9)
    rid = engine.add_request(follow_up, GREEDY)
    while engine.is_unfinished(rid):
        engine.step()
    out = engine.pop_finished(rid)
    # The first turn finished with 40 + 13 computed tokens: its state at token 48 (a chunk
    # boundary) was kept, with the KV of those 48 tokens.
    assert out.num_cached_tokens == 48
    assert engine.scheduler.memory_states.num_snapshot_hits == 1
    uncached = _engine(model_dir, cache={"enable_prefix_caching": False})
    assert out.token_ids == _run_all(uncached, [follow_up])[0]


def test_requests_admitted_together_share_one_snapshot(model_dir):
    engine = _engine(model_dir)
    [first] = _run_all(engine, [PROMPTS[4]])
    shared = PROMPTS[4] + first
    follow_ups = [shared + _prompt(200 + i, 5) for i in range(2)]
    ids = [engine.add_request(p, GREEDY) for p in follow_ups]  # admitted in the same step
    while engine.has_unfinished_requests():
        engine.step()
        engine.scheduler.check_invariants()
    outs = [engine.pop_finished(rid) for rid in ids]
    assert [o.num_cached_tokens for o in outs] == [48, 48]
    uncached = _engine(model_dir, cache={"enable_prefix_caching": False})
    assert [o.token_ids for o in outs] == _run_all(uncached, follow_ups)


def test_prefill_then_decode_hands_the_memory_state_over(model_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = _run_all(_engine(model_dir), PROMPTS, params)
    prefill, decode = _engine(model_dir), _engine(model_dir)
    for i, prompt in enumerate(PROMPTS):
        rid = prefill.add_request(prompt, replace(params, max_tokens=1), hold_kv=True)
        while prefill.is_unfinished(rid):
            prefill.step()
        first = prefill.pop_finished(rid).token_ids[0]
        exported = prefill.export_kv(rid)
        prefill.release_kv(rid)
        pending = exported.memory_state["layers.0.pending"]
        assert pending.shape[0] == len(prompt) % 8  # the inputs of the chunk being filled
        assert decode.add_prefilled_request(
            f"d{i}", prompt, first, params, exported.kv, memory_state=exported.memory_state
        )
    outputs = []
    for i in range(len(PROMPTS)):
        while decode.is_unfinished(f"d{i}"):
            decode.step()
        outputs.append(decode.pop_finished(f"d{i}").token_ids)
    assert outputs == expected
    decode.scheduler.check_invariants()


def test_bad_memory_states_are_refused_before_any_work(model_dir):
    prefill, decode = _engine(model_dir), _engine(model_dir)
    prompt = PROMPTS[3]
    rid = prefill.add_request(prompt, replace(GREEDY, max_tokens=1), hold_kv=True)
    while prefill.is_unfinished(rid):
        prefill.step()
    first = prefill.pop_finished(rid).token_ids[0]
    exported = prefill.export_kv(rid)
    with pytest.raises(ValueError, match="memory_state: expected the Titans memory state"):
        decode.add_prefilled_request("a", prompt, first, GREEDY, exported.kv)
    poisoned = dict(exported.memory_state)
    poisoned["layers.1.weights.0"] = poisoned["layers.1.weights.0"].clone()
    poisoned["layers.1.weights.0"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"memory_state\['layers.1.weights.0'\]: contains NaN"):
        decode.add_prefilled_request("b", prompt, first, GREEDY, exported.kv, memory_state=poisoned)
    short = dict(exported.memory_state)
    short["layers.0.pending"] = short["layers.0.pending"][:-1]
    with pytest.raises(ValueError, match=r"memory_state\['layers.0.pending'\]: expected shape"):
        decode.add_prefilled_request("c", prompt, first, GREEDY, exported.kv, memory_state=short)
    assert not decode.has_unfinished_requests()
    assert decode.scheduler.memory_states.num_free_slots == decode.scheduler.memory_states.num_slots


def test_titans_refuses_speculative_decoding(model_dir):
    config = EngineConfig(
        model=model_dir,
        cache=CacheConfig(block_size=4),
        speculative=SpeculativeConfig(draft_model=model_dir),
    )
    with pytest.raises(ValueError, match="speculative: not supported for Titans"):
        LLMEngine(config)


def test_block_size_must_divide_the_memory_chunk(model_dir):
    with pytest.raises(ValueError, match=r"cache\.block_size: expected a divisor of the Titans"):
        LLMEngine(EngineConfig(model=model_dir, cache=CacheConfig(block_size=16)))
