"""Every request is checked before any work: a bad field raises a ValueError that names it, and
nothing is queued, allocated or written (issue 12, "a serving path that loses nothing")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.engine.kv_cache import block_hashes_for
from raycake.engine.scheduler import RequestRejected
from tests.llama_checkpoints import CONFIGS, VOCAB_SIZE, build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks-model")
    build_checkpoint(CONFIGS[1], out)
    return LLM(str(out), block_size=4, num_kv_blocks=32, max_model_len=MAX_MODEL_LEN)


def _assert_untouched(llm: LLM, free_blocks: int) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_waiting == 0 and engine.scheduler.num_running == 0
    assert engine.scheduler.kv_cache.num_free_blocks == free_blocks
    engine.scheduler.check_invariants()


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        # top_k above the vocabulary: the engine knows the vocabulary, SamplingParams does not.
        ([5, 6], replace(GREEDY, top_k=VOCAB_SIZE + 1), rf"^top_k: .*\[0, {VOCAB_SIZE}\]"),
        ([5, 6], replace(GREEDY, stop_token_ids=(VOCAB_SIZE,)), r"^stop_token_ids: .*index 0"),
        ([5, True], GREEDY, r"^prompt: .*got True at index 1 \(a boolean"),
        ([False, 5], GREEDY, r"^prompt: .*got False at index 0 \(a boolean"),
        ([5, -1], GREEDY, rf"^prompt: expected integer token ids in \[0, {VOCAB_SIZE}\)"),
        ([5, VOCAB_SIZE], GREEDY, r"^prompt: .*outside the vocabulary"),
        ([5, 2.0], GREEDY, r"^prompt: .*not an integer"),
        ([], GREEDY, r"^prompts?: expected"),
        (
            list(range(60)),
            replace(GREEDY, max_tokens=5),
            rf"^max_tokens: expected prompt \+ max_tokens <= max_model_len {MAX_MODEL_LEN}",
        ),
    ],
    ids=[
        "top_k>vocab",
        "stop_token_id>=vocab",
        "prompt-True",
        "prompt-False",
        "prompt-negative",
        "prompt-beyond-vocab",
        "prompt-float",
        "empty-prompt",
        "beyond-max_model_len",
    ],
)
def test_a_bad_prompt_late_in_a_batch_queues_nothing(llm, prompt, params, match):
    free = llm.engine.scheduler.kv_cache.num_free_blocks
    good = [[7, 8, 9], [10, 11]]
    with pytest.raises(ValueError, match=match):
        # The good prompts come first: they must not be left queued behind the bad one.
        llm.generate([*good, prompt], [GREEDY, GREEDY, params])
    _assert_untouched(llm, free)
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, params)
    _assert_untouched(llm, free)
    assert [len(o.token_ids) for o in llm.generate(good, GREEDY)] == [4, 4]


def test_prompt_plus_max_tokens_is_checked_at_the_limit(llm):
    free = llm.engine.scheduler.kv_cache.num_free_blocks
    fits = llm.generate([list(range(60))], replace(GREEDY, max_tokens=4))[0]
    assert len(fits.token_ids) == 4 and fits.finish_reason == "length"
    with pytest.raises(RequestRejected, match="60 tokens \\+ max_tokens 5 = 65 tokens"):
        llm.generate([list(range(60))], replace(GREEDY, max_tokens=5))
    _assert_untouched(llm, free)


def test_request_ids_are_checked_before_queueing(llm):
    engine = llm.engine
    free = engine.scheduler.kv_cache.num_free_blocks
    with pytest.raises(ValueError, match="request_id: 'a' appears twice"):
        engine.add_requests([[1, 2], [3, 4]], [GREEDY, GREEDY], ["a", "a"])
    with pytest.raises(ValueError, match=r"^request_id: expected a non-empty string, got 7"):
        engine.add_request([1, 2], GREEDY, request_id=7)  # type: ignore[arg-type]
    _assert_untouched(llm, free)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": float("nan")}, r"^temperature: expected a finite number >= 0, got nan"),
        ({"temperature": float("inf")}, r"^temperature: expected a finite number >= 0, got inf"),
        ({"temperature": True}, r"^temperature: expected a finite number >= 0, got True"),
        ({"top_p": float("nan")}, r"^top_p: expected a finite number > 0 and <= 1, got nan"),
        ({"max_tokens": True}, r"^max_tokens: expected a positive integer, got True"),
        ({"top_k": True}, r"^top_k: expected an integer >= 0 \(0 disables\), got True"),
        ({"seed": True}, r"^seed: expected None or an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        ({"seed": 2**70}, r"^seed: .*torch.Generator.manual_seed.*got 1180591620717411303424"),
        ({"seed": -(2**63) - 1}, r"^seed: expected None or an integer"),
        ({"stop_token_ids": [True]}, r"^stop_token_ids: expected a list of int, got item True"),
        ({"stop_token_ids": [-1]}, r"^stop_token_ids: expected token ids >= 0, got -1"),
        ({"ignore_eos": 1}, r"^ignore_eos: expected true or false, got 1"),
    ],
)
def test_sampling_params_refuse_nan_inf_and_booleans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_seeds_at_the_ends_of_the_generator_range_run(llm):
    """The range in the seed check is exactly what the runner's generator accepts."""
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=3, ignore_eos=True)
        for seed in (-(2**63), 2**64 - 1, -1)
    ]
    outs = llm.generate([[5, 6, 7]] * 3, params)
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert all(o.error is None and len(o.token_ids) == 3 for o in outs)


def _prefilled_args(llm: LLM, n: int = 10):
    engine = llm.engine
    prompt = list(range(20, 20 + n))
    config = engine.model_config
    kv = torch.zeros(
        config.num_hidden_layers, 2, -(-n // 4), 4, config.num_key_value_heads, config.head_dim
    )
    return prompt, kv


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prompt_token_ids": [20, True, 22]}, r"^prompt_token_ids: .*got True at index 1"),
        ({"prompt_token_ids": []}, r"^prompt_token_ids: expected a non-empty list"),
        ({"first_token_id": VOCAB_SIZE}, r"^first_token_id: .*outside the vocabulary"),
        ({"first_token_id": True}, r"^first_token_id: .*a boolean"),
        ({"sampling_params": replace(GREEDY, top_k=10**6)}, r"^top_k: expected an integer in"),
        (
            {"sampling_params": replace(GREEDY, max_tokens=60)},
            rf"^max_tokens: expected prompt \+ max_tokens <= max_model_len {MAX_MODEL_LEN}",
        ),
        ({"kv": "kv"}, r"^kv: expected a floating-point tensor, got str"),
        (
            {"kv": torch.zeros(2, 2, 2, 4, 2, 16)},
            r"^kv: expected shape .*got \(2, 2, 2, 4, 2, 16\)",
        ),
        ({"features": torch.zeros(9, 64)}, r"^features: expected shape \(10, 64\)"),
        ({"block_hashes": [b"x" * 16, b"y" * 16]}, r"^block_hashes: .*different hash at block 0"),
        ({"block_hashes": []}, r"^block_hashes: expected 2 hashes .* got 0"),
        ({"request_id": ""}, r"^request_id: expected a non-empty string"),
    ],
)
def test_add_prefilled_request_checks_everything_before_any_work(llm, change, match):
    engine = llm.engine
    free = engine.scheduler.kv_cache.num_free_blocks
    prompt, kv = _prefilled_args(llm)
    args = {
        "request_id": "p",
        "prompt_token_ids": prompt,
        "first_token_id": 5,
        "sampling_params": GREEDY,
        "kv": kv,
        **change,
    }
    written = []
    original = engine.runner.write_blocks
    engine.runner.write_blocks = lambda *a: written.append(a) or original(*a)
    try:
        with pytest.raises(ValueError, match=match):
            engine.add_prefilled_request(**args)
    finally:
        engine.runner.write_blocks = original
    assert written == []  # no KV was copied in
    _assert_untouched(llm, free)


def test_add_prefilled_request_accepts_the_prompts_own_block_hashes(llm):
    engine = llm.engine
    free = engine.scheduler.kv_cache.num_free_blocks
    prompt, kv = _prefilled_args(llm)
    hashes = block_hashes_for(prompt, 4)
    assert len(hashes) == 2
    engine.check_prompt_block_hashes(prompt, hashes)
    with pytest.raises(ValueError, match=r"^block_hashes: .*different hash at block 1"):
        engine.check_prompt_block_hashes(prompt, [hashes[0], hashes[0]])
    assert engine.add_prefilled_request("p", prompt, 5, GREEDY, kv, block_hashes=hashes)
    while engine.is_unfinished("p"):
        engine.step()
    out = engine.pop_finished("p")
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    _assert_untouched(llm, free)
