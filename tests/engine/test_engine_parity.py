"""raycake's engine against transformers on the same checkpoints: logits and greedy tokens."""

from __future__ import annotations

import torch

from raycake import LLM, SamplingParams

# Different lengths, so one step mixes decodes and prefill chunks at different positions.
PROMPTS = [
    [0, 5, 17, 33, 99, 2, 7],
    [0, 250, 3],
    [0, *range(10, 80)],
    [0, 42],
    [0, *range(100, 141)],
]


def _hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0]  # [S, V]


def test_logits_match_transformers_across_mixed_steps(tiny_llama):
    """Every position's logits, computed in chunked, batched, paged steps, equal transformers'."""
    model_dir, hf_model = tiny_llama
    # Small chunks and budget: prompts are prefilled over several steps beside others' decodes.
    llm = LLM(str(model_dir), block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
    engine = llm.engine
    runner = engine.runner
    captured: list[tuple[str, int, torch.Tensor]] = []
    run_model = runner.run_model

    # The runner flattens a step as: one-token decodes first (shortest context first), then
    # each prefill chunk whole; the step's inputs say in which order.
    def capture_exact(out):
        states_before = {rid: s.num_computed_tokens for rid, s in runner.requests.items()}
        for new in out.new_requests:
            states_before[new.request_id] = new.num_computed_tokens
        inputs, hidden = run_model(out)
        logits = runner.model.compute_logits(hidden)  # [T, V]
        decode_ids = inputs.sample_request_ids[: inputs.meta.num_decode_tokens]
        chunk_ids = inputs.span_request_ids
        assert sorted(decode_ids + chunk_ids) == sorted(out.num_scheduled_tokens)
        offset = 0
        for rid in decode_ids + chunk_ids:
            n = out.num_scheduled_tokens[rid]
            captured.append((rid, states_before[rid], logits[offset : offset + n]))
            offset += n
        assert offset == logits.shape[0]
        return inputs, hidden

    runner.run_model = capture_exact
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    ids = {out.request_id: out.prompt_token_ids + out.token_ids for out in outputs}
    checked = 0
    for rid, start, logits in captured:
        expected = _hf_logits(hf_model, ids[rid])[start : start + logits.shape[0]]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        checked += logits.shape[0]
    # Every prompt token and every generated token but the last went through the model once.
    assert checked == sum(len(p) + 6 - 1 for p in PROMPTS)


def test_greedy_tokens_match_generate_concurrently(tiny_llama):
    model_dir, hf_model = tiny_llama
    llm = LLM(str(model_dir), block_size=8, max_num_batched_tokens=64)
    max_new = 12
    outputs = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    )
    hf_model.generation_config.eos_token_id = None
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        with torch.no_grad():
            input_ids = torch.tensor([prompt])
            expected = hf_model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == expected
        assert out.finish_reason == "length"
