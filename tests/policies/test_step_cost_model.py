"""The step-time regression: its formulas, fitting it from samples, and shipping it as plain data."""

from __future__ import annotations

import json
import math
import random

import pytest

from raycake.policies.step_cost_model import (
    DecodeSample,
    PrefillSample,
    StepCostModel,
    attention_work,
    transfer_seconds,
)

TRUE = StepCostModel(
    prefill_fixed_s=0.015,
    prefill_per_token_s=1.2e-4,
    prefill_per_token_pair_s=3e-8,
    decode_fixed_s=0.008,
    decode_per_seq_s=4e-4,
    decode_per_context_token_s=2e-6,
)
PREFILL_POINTS = [(new, cached) for new in (64, 256, 1024, 4096) for cached in (0, 512, 2048)]
DECODE_POINTS = [
    (batch, batch * per_seq) for batch in (1, 8, 32, 64) for per_seq in (128, 1024, 4096)
]


def _samples(model: StepCostModel, noise: float = 0.0, repeats: int = 1, seed: int = 0):
    rng = random.Random(seed)
    jitter = lambda: 1.0 + rng.uniform(-noise, noise)  # noqa: E731
    prefill = [
        PrefillSample(new, cached, model.prefill_seconds(new, cached) * jitter())
        for new, cached in PREFILL_POINTS
        for _ in range(repeats)
    ]
    decode = [
        DecodeSample(batch, context, model.decode_step_seconds(batch, context) * jitter())
        for batch, context in DECODE_POINTS
        for _ in range(repeats)
    ]
    return prefill, decode


def test_formulas_by_hand():
    # 0.015 + 1.2e-4 * 256 + 3e-8 * 256 * (512 + 128)
    assert TRUE.prefill_seconds(256, 512) == pytest.approx(0.015 + 0.03072 + 0.0049152)
    assert TRUE.prefill_seconds(0, 512) == 0.0  # nothing to compute, no fixed cost
    # 0.008 + 4e-4 * 8 + 2e-6 * 8192
    assert TRUE.decode_step_seconds(8, 8192) == pytest.approx(0.008 + 0.0032 + 0.016384)
    assert TRUE.decode_step_seconds(0, 0) == 0.0
    assert transfer_seconds(48e6, 480e6) == pytest.approx(0.1)


def test_attention_work_adds_up_over_chunks():
    # Chunked prefill of 300 then 700 tokens after 100 cached == one chunk of 1000.
    assert attention_work(300, 100) + attention_work(700, 400) == attention_work(1000, 100)


def test_fit_recovers_known_coefficients_exactly():
    fitted = StepCostModel.fit(*_samples(TRUE))
    for name, value in TRUE.to_dict().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-8), name


def test_fit_is_robust_to_noise():
    fitted = StepCostModel.fit(*_samples(TRUE, noise=0.05, repeats=8))
    for new, cached in PREFILL_POINTS:
        truth = TRUE.prefill_seconds(new, cached)
        assert fitted.prefill_seconds(new, cached) == pytest.approx(truth, rel=0.03)
    for batch, context in DECODE_POINTS:
        truth = TRUE.decode_step_seconds(batch, context)
        assert fitted.decode_step_seconds(batch, context) == pytest.approx(truth, rel=0.03)
    assert fitted.prefill_per_token_pair_s == pytest.approx(3e-8, rel=0.1)
    assert fitted.decode_per_context_token_s == pytest.approx(2e-6, rel=0.1)


def test_fit_clamps_a_zero_coefficient_at_zero_not_below():
    # A true zero plus noise pulls plain least squares negative; the fit must stay >= 0.
    truth = StepCostModel(**{**TRUE.to_dict(), "decode_fixed_s": 0.0, "prefill_fixed_s": 0.0})
    unconstrained_went_negative = False
    for seed in range(5):
        fitted = StepCostModel.fit(*_samples(truth, noise=0.05, seed=seed))
        assert fitted.decode_fixed_s >= 0.0 and fitted.prefill_fixed_s >= 0.0
        unconstrained_went_negative |= fitted.decode_fixed_s == 0.0 or fitted.prefill_fixed_s == 0.0
        for batch, context in DECODE_POINTS:
            expected = truth.decode_step_seconds(batch, context)
            assert fitted.decode_step_seconds(batch, context) == pytest.approx(expected, rel=0.05)
    assert unconstrained_went_negative  # the clamp was exercised, not just the easy case


def test_refit_decode_replaces_the_decode_half_and_keeps_the_prefill_half():
    # The node got 2.5x slower at decoding since start-up: recent steps say so.
    slower = StepCostModel(
        **{
            **TRUE.to_dict(),
            "decode_fixed_s": 0.02,
            "decode_per_seq_s": 1e-3,
            "decode_per_context_token_s": 5e-6,
        }
    )
    _, recent = _samples(slower)
    refitted = TRUE.refit_decode(recent)
    for name in ("decode_fixed_s", "decode_per_seq_s", "decode_per_context_token_s"):
        assert getattr(refitted, name) == pytest.approx(getattr(slower, name), rel=1e-8), name
    for name in ("prefill_fixed_s", "prefill_per_token_s", "prefill_per_token_pair_s"):
        assert getattr(refitted, name) == getattr(TRUE, name), name
    with pytest.raises(ValueError, match=r"decode_samples: expected at least 3 distinct"):
        TRUE.refit_decode(recent[:2])


def test_fit_rejects_too_few_or_collinear_samples():
    prefill, decode = _samples(TRUE)
    repeated = [PrefillSample(256, 0, 0.05)] * 5 + [PrefillSample(512, 0, 0.1)]
    with pytest.raises(ValueError, match=r"prefill_samples: expected at least 3 distinct"):
        StepCostModel.fit(repeated, decode)
    one_length = [PrefillSample(256, cached, 0.05 + cached * 1e-5) for cached in (0, 64, 128)]
    with pytest.raises(ValueError, match=r"prefill_samples: .*collinear"):
        StepCostModel.fit(one_length, decode)
    fixed_context_per_seq = [DecodeSample(b, 512 * b, 0.01 + 0.001 * b) for b in (1, 2, 4, 8)]
    with pytest.raises(ValueError, match=r"decode_samples: .*collinear"):
        StepCostModel.fit(prefill, fixed_context_per_seq)
    no_context = [DecodeSample(b, 0, 0.01 * b) for b in (1, 2, 4)]
    with pytest.raises(ValueError, match=r"decode_samples: .*collinear"):
        StepCostModel.fit(prefill, no_context)
    with pytest.raises(ValueError, match=r"decode_samples: expected at least 3"):
        StepCostModel.fit(prefill, [])
    with pytest.raises(ValueError, match=r"prefill_samples: expected PrefillSample items"):
        StepCostModel.fit([(256, 0, 0.05)], decode)


@pytest.mark.parametrize("seconds", [0.0, -0.1, math.nan, math.inf])
def test_samples_need_finite_positive_seconds(seconds):
    with pytest.raises(ValueError, match=r"PrefillSample.seconds: expected a finite number > 0"):
        PrefillSample(256, 0, seconds)
    with pytest.raises(ValueError, match=r"DecodeSample.seconds: expected a finite number > 0"):
        DecodeSample(8, 1024, seconds)


def test_sample_and_coefficient_validation_names_the_field():
    with pytest.raises(ValueError, match=r"PrefillSample.num_new_tokens: expected an integer >= 1"):
        PrefillSample(0, 0, 0.1)
    with pytest.raises(ValueError, match=r"DecodeSample.batch_size: expected an integer >= 1"):
        DecodeSample(0, 0, 0.1)
    with pytest.raises(
        ValueError, match=r"cost_model.decode_per_seq_s: expected a finite number >= 0"
    ):
        StepCostModel(**{**TRUE.to_dict(), "decode_per_seq_s": -1e-4})
    with pytest.raises(ValueError, match=r"bandwidth_bytes_per_s: expected a finite number > 0"):
        transfer_seconds(1e6, 0)


def test_round_trips_through_json():
    data = json.loads(json.dumps(TRUE.to_dict()))
    assert StepCostModel.from_dict(data) == TRUE
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['extra'\]"):
        StepCostModel.from_dict({**data, "extra": 1.0})
    del data["decode_fixed_s"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['decode_fixed_s'\]"):
        StepCostModel.from_dict(data)
