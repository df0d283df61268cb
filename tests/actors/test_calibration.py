"""An instance's cost model comes from its own measured steps."""

from __future__ import annotations

from raycake.actors.calibration import calibrate, samples_from_steps
from raycake.engine.config import EngineConfig
from raycake.engine.engine_stats import StepRecord
from raycake.engine.llm_engine import LLMEngine


def test_calibration_fits_the_engine_it_ran_on():
    engine = LLMEngine(EngineConfig())
    model = calibrate(engine)
    # Longer prompts and larger batches cost more; an empty step costs nothing.
    assert model.prefill_seconds(320, 0) > model.prefill_seconds(16, 0) > 0
    assert model.decode_step_seconds(12, 400) >= model.decode_step_seconds(1, 20) > 0
    assert model.prefill_seconds(0, 100) == 0
    # Calibration leaves no request and no cached prefix behind.
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache.usage == 0
    assert engine.num_cached_prefix_blocks(engine.prefix_block_hashes(list(range(64)))) == 0


def test_steps_split_into_prefill_and_decode_samples():
    steps = [
        StepRecord(100, 1, 100, 0.02),
        StepRecord(8, 8, 400, 0.004),
        StepRecord(40, 5, 90, 0.01),
    ]
    prefill, decode = samples_from_steps(steps)
    assert [(s.num_new_tokens, s.num_cached_tokens) for s in prefill] == [(100, 0), (40, 50)]
    assert [(s.batch_size, s.total_context_tokens) for s in decode] == [(8, 400)]
