"""The whole single-instance engine on a tiny random checkpoint: caching, streaming, stops, faults."""

from __future__ import annotations

import pytest

from raycake import LLM, SamplingParams
from raycake.engine.scheduler import RequestRejected
from tests.llama_checkpoints import CONFIGS, build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-model")
    build_checkpoint(CONFIGS[1], out)
    return str(out)


def test_second_request_with_same_prefix_is_served_from_the_prefix_cache(model_dir):
    llm = LLM(model_dir, block_size=4)
    shared = list(range(3, 40))  # 37 tokens: 9 full blocks
    first = llm.generate([[*shared, 200, 201]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    runner = llm.engine.runner
    scheduled = []
    original = runner.run_model

    def spy(out):
        scheduled.append(dict(out.num_scheduled_tokens))
        return original(out)

    runner.run_model = spy  # records what each step computes
    second = llm.generate([[*shared, 250, 251, 252]], GREEDY)[0]
    assert second.num_cached_tokens == 36  # 9 full blocks of the shared 37 tokens
    # The first step prefilled only the 4 uncached prompt tokens (37th shared token + 3 new).
    assert list(scheduled[0].values()) == [4]
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits == 36


def test_prefix_cache_does_not_change_outputs(model_dir):
    prompts = [[*range(5, 30), t] for t in (100, 101, 102)]
    llm = LLM(model_dir, block_size=4)
    # Blocks are shared once computed: the first request fills the cache for the next two.
    cached = llm.generate(prompts[:1], GREEDY) + llm.generate(prompts[1:], GREEDY)
    plain = LLM(model_dir, block_size=4, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert [o.num_cached_tokens for o in cached] == [0, 24, 24]


def test_preemption_recomputes_without_changing_greedy_output(model_dir):
    prompts = [list(range(10 + i, 40 + i)) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = LLM(model_dir, block_size=4).generate(prompts, params)
    # 40 blocks of 4 tokens cannot hold 6 x (30 + 20) tokens at once: requests get preempted.
    tight_llm = LLM(model_dir, block_size=4, num_kv_blocks=40)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_streamed_deltas_add_up_to_the_final_output(model_dir):
    llm = LLM(model_dir)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=15, ignore_eos=True)
    deltas = list(llm.stream("def fibonacci(n):", params))
    final = LLM(model_dir).generate("def fibonacci(n):", params)[0]
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids


def test_same_seed_same_output_whatever_the_batch(model_dir):
    llm = LLM(model_dir)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded)[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]], [noise, seeded, noise])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=12, max_tokens=12, ignore_eos=True)
    assert llm.generate([[5, 6, 7]], other_seed)[0].token_ids != alone


def test_stop_token_ids_and_stop_strings(model_dir):
    llm = LLM(model_dir)
    free = llm.generate([[5, 6, 7]], GREEDY)[0]
    stop_at = free.token_ids[3]
    by_id = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at])
    )[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    by_str = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop])
    )[0]
    assert by_str.finish_reason == "stop"
    assert by_str.text == text[: text.index(stop)]


def test_metrics_report_ttft_and_tbt(model_dir):
    out = LLM(model_dir).generate([[5, 6, 7]], GREEDY)[0]
    m = out.metrics
    assert m.ttft is not None and m.ttft > 0
    assert len(m.tbt) == 9 and all(gap >= 0 for gap in m.tbt)
    assert m.finished_time >= m.first_token_time >= m.arrival_time


def test_abort_frees_the_request(model_dir):
    llm = LLM(model_dir)
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    out = engine.pop_finished(rid)
    assert out.finish_reason == "abort"
    assert engine.scheduler.kv_cache.usage == 0.0
    engine.scheduler.check_invariants()


def test_bad_requests_fail_clearly(model_dir):
    llm = LLM(model_dir, max_model_len=64)
    with pytest.raises(RequestRejected, match="max_model_len 64"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 100000]], GREEDY)
    with pytest.raises(ValueError, match="sampling_params: got 1 for 2 prompts"):
        llm.generate([[1], [2]], [GREEDY])
    with pytest.raises(TypeError, match="prompt"):
        llm.engine.add_request(3.14)  # type: ignore[arg-type]
