"""An instance measures its own step times and fits the cost model the conductor plans with."""

from __future__ import annotations

import random
from collections.abc import Iterable

from raycake.engine.engine_stats import StepRecord
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.policies.step_cost_model import DecodeSample, PrefillSample, StepCostModel


def samples_from_steps(
    steps: Iterable[StepRecord],
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Split measured steps into prefill-like and decode-only samples."""
    prefill, decode = [], []
    for step in steps:
        if step.is_decode_only:
            decode.append(DecodeSample(step.num_requests, step.num_context_tokens, step.seconds))
        else:
            # NOTE: a mixed step counts as prefill of all its tokens; the context beyond them
            # stands in for the cached prefix.
            cached = max(0, step.num_context_tokens - step.num_tokens)
            prefill.append(PrefillSample(step.num_tokens, cached, step.seconds))
    return prefill, decode


def calibrate(
    engine: LLMEngine,
    prompt_lengths: tuple[int, ...] = (16, 64, 160, 320),
    batch_sizes: tuple[int, ...] = (1, 4, 12),
    decode_steps: int = 6,
    seed: int = 0,
) -> StepCostModel:
    """Time prefills of several lengths and decodes at several batch sizes, then fit.

    Uses random prompts with prefix caching bypassed (distinct tokens), one request at a time
    for prefill, so each step's time belongs to one known shape.
    """
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    max_len = engine.max_model_len - decode_steps - 1
    steps: list[StepRecord] = []

    def run_all() -> None:
        while engine.has_unfinished_requests():
            engine.step()
            if engine.last_step is not None and engine.last_step.num_tokens:
                steps.append(engine.last_step)

    for length in prompt_lengths:
        prompt = [rng.randrange(vocab) for _ in range(min(length, max_len))]
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        run_all()
    for batch in batch_sizes:
        for i in range(batch):
            prompt = [rng.randrange(vocab) for _ in range(min(8 + 24 * i, max_len))]
            engine.add_request(
                prompt, SamplingParams(temperature=0, max_tokens=decode_steps, ignore_eos=True)
            )
        run_all()
    engine.pop_all_finished()  # calibration outputs are nobody's results
    engine.scheduler.reset_prefix_cache()
    prefill, decode = samples_from_steps(steps)
    return StepCostModel.fit(prefill, decode)
