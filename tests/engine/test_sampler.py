"""Sampling filters and per-request generators, on hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch

from raycake.engine.sampler import apply_top_k_top_p, sample_rows
from raycake.engine.sampling_params import SamplingParams


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_rows_take_the_argmax_whatever_the_generator():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    params = [SamplingParams(temperature=0)] * 2
    assert sample_rows(logits, params, [_gen(0), _gen(1)]) == [1, 0]


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    kept = apply_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the first two tokens carry the mass.
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.7)).tolist() == [True, True, False, False]
    # The top token always survives, even when it alone exceeds top_p.
    assert torch.isfinite(apply_top_k_top_p(logits, 0, 0.1)).tolist() == [True, False, False, False]


def test_same_seed_same_tokens_regardless_of_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [sample_rows(logits[1:2], [params], [_gen(7)])[0] for _ in range(1)]
    gens = [_gen(1), _gen(7), _gen(3)]
    other = SamplingParams(temperature=0.5)
    batched = sample_rows(logits, [other, params, other], gens)
    assert batched[1] == alone[0]


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=2.0)]
    gen = _gen(123)
    draws = [sample_rows(logits, params, [gen])[0] for _ in range(4000)]
    expected = (logits[0] / 2.0).softmax(-1)
    observed = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    # 4,000 draws: the standard error of each frequency is below 0.008.
    assert torch.allclose(observed, expected, atol=0.03)
    assert math.isclose(observed.sum().item(), 1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sample_rows_fails_a_nan_row_and_a_raising_row_alone(monkeypatch):
    from raycake.engine import sampler

    logits = torch.tensor([[0.1, 3.0, 0.2], [1.0, float("nan"), 0.0], [5.0, 1.0, 4.9]] * 2)
    greedy, seeded = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)
    params = [greedy, greedy, greedy, seeded, seeded, seeded]
    gens = [_gen(i) for i in range(6)]
    original = sampler.sample_batch
    calls = []

    def sample_batch(rows, ps, generators):
        calls.append(len(rows))
        # The batch of both sampled rows raises, then (redrawn alone) the last row does.
        if len(rows) > 1 or len(calls) == 3:
            raise RuntimeError("boom")
        return original(rows, ps, generators)

    monkeypatch.setattr(sampler, "sample_batch", sample_batch)
    tokens = sampler.sample_rows(logits, params, gens)
    nan_error = sampler.SampleError("sampling: the model's logits contain NaN")
    assert tokens[:3] == [1, nan_error, 0]
    # Redrawn from the generator state the failed batch started from.
    assert tokens[3] == original(logits[3:4], [seeded], [_gen(3)])[0]
    assert tokens[4] == nan_error  # never reaches sample_row
    assert tokens[5] == sampler.SampleError("sampling: RuntimeError: boom")
    assert sample_rows(logits[:2], params[:2], gens[:2])[1] == nan_error


def test_a_batched_draw_equals_each_row_drawn_alone_and_respects_its_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    params = [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, top_k=3, seed=2),
        SamplingParams(temperature=1.3, top_p=0.5, seed=3),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.8, seed=4),
    ]
    top3 = set(logits[1].topk(3).indices.tolist())
    for draw in range(200):
        batch = sample_rows(logits, params, [_gen(100 * draw + i) for i in range(4)])
        alone = [
            sample_rows(logits[i : i + 1], [params[i]], [_gen(100 * draw + i)])[0] for i in range(4)
        ]
        assert batch == alone
        assert batch[1] in top3
        kept = apply_top_k_top_p(logits[2] / 1.3, 0, 0.5)
        assert torch.isfinite(kept[batch[2]])


def test_filtered_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]])
    params = [SamplingParams(temperature=1.0, top_k=5, top_p=0.8)]
    gen = _gen(5)
    draws = [sample_rows(logits, params, [gen])[0] for _ in range(4000)]
    expected = apply_top_k_top_p(logits[0], 5, 0.8).softmax(-1)
    observed = torch.bincount(torch.tensor(draws), minlength=8).float() / len(draws)
    assert torch.allclose(observed, expected, atol=0.03)


def test_top_p_reaches_past_the_first_candidates_when_they_lack_the_mass():
    # A flat distribution: 90% of the mass needs ~270 of 300 tokens, past the first 64 and 128.
    logits = torch.linspace(0.0, -0.5, 300)[None, :]
    params = [SamplingParams(temperature=1.0, top_p=0.9)]
    kept = torch.isfinite(apply_top_k_top_p(logits[0], 0, 0.9))
    gen = _gen(11)
    draws = [sample_rows(logits, params, [gen])[0] for _ in range(2000)]
    assert all(kept[t] for t in draws)
    assert max(draws) >= 200 and int(kept.sum()) > 256
