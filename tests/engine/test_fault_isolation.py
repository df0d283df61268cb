"""One poisoned request never breaks the engine: it ends with "error" and its message, its blocks
are freed, everyone else's tokens are exactly what they would have been, and the engine keeps
serving."""

from __future__ import annotations

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.engine import sampler
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.runner import SpecDecodeRunner
from raycake.model.eagle import EagleDraftHead, save_eagle_head
from raycake.model.loader import read_model_config
from tests.llama_checkpoints import CONFIGS, build_checkpoint

POISON_SEED = 666  # the request whose sampling raises (seeds are otherwise ordinary)
PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((5, 11, 17, 9, 23))]
# Greedy and seeded requests: both are batch-independent, so a run without the poisoned request
# is the reference, token for token.
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2, max_tokens=15, ignore_eos=True),
]
POISONED = SamplingParams(temperature=1.0, seed=POISON_SEED, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-model")
    build_checkpoint(CONFIGS[1], out / "target")
    torch.manual_seed(3)
    save_eagle_head(EagleDraftHead(read_model_config(out / "target")), out / "head")
    return out


def _llm(model_dir, speculative: bool = False) -> LLM:
    spec = None
    if speculative:
        spec = SpeculativeConfig(
            draft_model=str(model_dir / "head"), num_draft_tokens=6, tree_top_k=3, max_depth=3
        )
    return LLM(
        str(model_dir / "target"), block_size=4, num_kv_blocks=96, max_num_seqs=8, speculative=spec
    )


def _poison_sampling(monkeypatch) -> None:
    """The poisoned row raises in the draw, in a batch and alone (sample_rows then redraws the
    batch row by row to find it)."""
    original = sampler.sample_batch

    def sample_batch(logits, params, generators):
        if any(p.seed == POISON_SEED for p in params):
            raise RuntimeError("poisoned row")
        return original(logits, params, generators)

    monkeypatch.setattr(sampler, "sample_batch", sample_batch)


def _check_clean(llm: LLM, free_blocks: int) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_invariants()
    assert engine.scheduler.kv_cache.num_free_blocks == free_blocks
    # The runner drops finished requests (failed ones included) at the next step.
    assert engine.step() == []
    assert engine.runner.requests == {}
    if isinstance(engine.runner, SpecDecodeRunner):
        assert engine.runner.head_states == {}


def test_a_request_whose_sampling_raises_fails_alone(model_dir, monkeypatch):
    reference = [o.token_ids for o in _llm(model_dir).generate(PROMPTS[:4], PARAMS)]
    _poison_sampling(monkeypatch)
    llm = _llm(model_dir)
    free = llm.engine.scheduler.kv_cache.num_free_blocks
    # The poisoned request sits in the middle of the batch, prefilled with the others.
    prompts = [*PROMPTS[:2], PROMPTS[4], *PROMPTS[2:4]]
    outs = llm.generate(prompts, [*PARAMS[:2], POISONED, *PARAMS[2:]])
    bad = outs.pop(2)
    assert (bad.finish_reason, bad.token_ids) == ("error", [])
    assert bad.error == "sampling: RuntimeError: poisoned row"
    assert [o.token_ids for o in outs] == reference
    assert [o.finish_reason for o in outs] == ["length"] * 4
    assert all(o.error is None for o in outs)
    _check_clean(llm, free)
    # The engine still serves, the poisoned parameters' next request fails the same way.
    again = llm.generate([PROMPTS[0], PROMPTS[4]], [PARAMS[0], POISONED])
    assert again[0].token_ids == reference[0] and again[1].finish_reason == "error"
    _check_clean(llm, free)


def test_stream_delivers_the_error(model_dir, monkeypatch):
    _poison_sampling(monkeypatch)
    llm = _llm(model_dir)
    deltas = list(llm.stream(PROMPTS[1], POISONED))
    assert [(d.finished, d.finish_reason, d.error) for d in deltas] == [
        (True, "error", "sampling: RuntimeError: poisoned row")
    ]
    assert not llm.engine.has_unfinished_requests()


def test_nan_logits_fail_the_request_instead_of_sampling_garbage(model_dir, monkeypatch):
    reference = [o.token_ids for o in _llm(model_dir).generate(PROMPTS[:2], PARAMS[:2])]
    llm = _llm(model_dir)
    free = llm.engine.scheduler.kv_cache.num_free_blocks
    model, runner = llm.engine.model, llm.engine.runner
    compute_logits = model.compute_logits

    def poisoned_logits(hidden):
        logits = compute_logits(hidden)
        # The row of the request whose last token is 99: a NaN the forward might produce.
        for row, rid in enumerate(current_ids):
            if runner.requests[rid].token_ids[-1] == 99:
                logits[row, 7] = float("nan")
        return logits

    current_ids: list[str] = []
    original_sample = runner._sample

    def sample(inputs, hidden):
        current_ids[:] = inputs.sample_request_ids
        return original_sample(inputs, hidden)

    monkeypatch.setattr(model, "compute_logits", poisoned_logits)
    monkeypatch.setattr(runner, "_sample", sample)
    greedy_nan = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([*PROMPTS[:2], [5, 6, 99]], [*PARAMS[:2], greedy_nan])
    assert [o.token_ids for o in outs[:2]] == reference
    assert outs[2].finish_reason == "error" and outs[2].token_ids == []
    assert outs[2].error == "sampling: the model's logits contain NaN"
    _check_clean(llm, free)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "eagle"])
def test_a_step_that_raises_fails_only_its_requests(model_dir, monkeypatch, speculative):
    """The forward raises once, mid-decode: every request of that step ends "error", the
    scheduler and runner agree again, blocks return, and later requests run normally."""
    reference = _llm(model_dir, speculative).generate(PROMPTS[:4], PARAMS)
    llm = _llm(model_dir, speculative)
    engine = llm.engine
    free = engine.scheduler.kv_cache.num_free_blocks
    model = engine.model
    forward = type(model).forward
    calls = {"n": 0}

    def flaky_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("device lost")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky_forward)
    ids = engine.add_requests(PROMPTS[:4], PARAMS)
    finished = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.finished:
                finished[delta.request_id] = (delta.finish_reason, delta.error)
        engine.scheduler.check_invariants()
    assert calls["n"] == 4  # nothing ran after the failed step: every request was in it
    assert set(finished.values()) == {("error", "step failed: RuntimeError: device lost")}
    assert set(finished) == set(ids)  # all four were in the failing step
    outs = [engine.pop_finished(rid) for rid in ids]
    assert all(o.error == "step failed: RuntimeError: device lost" for o in outs)
    # Tokens delivered before the failure are kept, and are the reference's prefix.
    for out, ref in zip(outs, reference, strict=True):
        assert out.token_ids == ref.token_ids[: len(out.token_ids)]
    _check_clean(llm, free)
    again = llm.generate(PROMPTS[:4], PARAMS)
    assert [o.token_ids for o in again] == [o.token_ids for o in reference]
    _check_clean(llm, free)


def test_a_verification_that_raises_fails_only_its_request(model_dir, monkeypatch):
    # Speculative sampling keeps the distribution, not the tokens: the reference drafts too.
    spec_reference = _llm(model_dir, speculative=True).generate(PROMPTS[:4], PARAMS)
    reference = [o.token_ids for o in spec_reference]
    llm = _llm(model_dir, speculative=True)
    runner = llm.engine.runner
    free = llm.engine.scheduler.kv_cache.num_free_blocks
    verdict = runner._verdict

    def poisoned(state, tree, logits):
        if state.sampling_params.seed == POISON_SEED:
            raise RuntimeError("poisoned tree")
        return verdict(state, tree, logits)

    monkeypatch.setattr(runner, "_verdict", poisoned)
    greedy_poisoned = SamplingParams(temperature=0, seed=POISON_SEED, max_tokens=8)
    outs = llm.generate([*PROMPTS[:4], PROMPTS[4]], [*PARAMS, greedy_poisoned])
    bad = outs.pop()
    assert bad.finish_reason == "error"
    assert bad.error == "verification: RuntimeError: poisoned tree"
    assert len(bad.token_ids) == 1  # its first token came from the prefill, before any tree
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.spec_stats().num_verify_steps > 0
    _check_clean(llm, free)
