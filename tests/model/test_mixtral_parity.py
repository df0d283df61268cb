"""Mixtral checkpoints load into the same engine: logits and greedy tokens equal transformers'."""

from __future__ import annotations

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.model.loader import load_model, save_checkpoint
from tests.llama_checkpoints import build_mixtral_checkpoint

PROMPTS = [[0, 5, 17, 33, 99, 2, 7], [0, *range(10, 60)], [0, 250, 3]]


@pytest.mark.parametrize("num_experts", [4, 8])
def test_mixtral_logits_and_greedy_tokens_match(tmp_path, num_experts):
    hf = build_mixtral_checkpoint(tmp_path, num_experts)
    ours = load_model(tmp_path)
    assert ours.config.num_experts == num_experts
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.compute_logits(ours(ids, torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outputs = LLM(str(tmp_path), block_size=4, max_num_batched_tokens=32, max_num_seqs=8).generate(
        PROMPTS, params
    )
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            reference = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=10,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == reference


def test_mixtral_round_trips_through_save_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    build_mixtral_checkpoint(tmp_path / "src", 4)
    ours = load_model(tmp_path / "src")
    save_checkpoint(ours, tmp_path / "dst")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            again(ids).logits,
            ours.compute_logits(ours(ids, torch.arange(ids.shape[1])[None])),
            atol=1e-5,
            rtol=0,
        )
