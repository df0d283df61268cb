"""The roofline cost model against hand-computed numbers."""

from __future__ import annotations

import pytest

from raycake.model.config import ModelConfig
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.roofline import (
    GPU_PRESETS,
    MODEL_PRESETS,
    ModelShape,
    RooflineCostModel,
    gpu_preset,
    model_preset,
)


def _h100_70b(**kwargs) -> RooflineCostModel:
    return RooflineCostModel(gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), **kwargs)


def test_model_shapes_match_published_sizes():
    assert MODEL_PRESETS["llama3-8b"].num_params == pytest.approx(8.03e9, rel=0.01)
    assert MODEL_PRESETS["llama3-70b"].num_params == pytest.approx(70.6e9, rel=0.01)
    mixtral = MODEL_PRESETS["mixtral-8x7b"]
    assert mixtral.num_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_layer_params + mixtral.lm_head_params == pytest.approx(12.9e9, rel=0.03)
    # 2 (K, V) x 80 layers x 8 KV heads x 128 x 2 bytes.
    assert MODEL_PRESETS["llama3-70b"].kv_bytes_per_token == 327_680


def test_from_model_config_keeps_the_shape_and_experts():
    config = ModelConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        num_experts=8,
        num_experts_per_tok=1,
        decoder_sparse_step=2,
        router_type="switch",
    )
    shape = ModelShape.from_model_config(config, name="tiny-moe")
    assert (shape.num_layers, shape.num_kv_heads, shape.num_experts) == (4, 2, 8)
    assert shape.num_moe_layers == 2 and shape.experts_per_token == 1
    dense_mlp = 3 * 256 * 512
    attention = 256 * (256 + 2 * 64) + 256 * 256
    assert shape.active_layer_params == 4 * attention + 2 * dense_mlp + 2 * dense_mlp
    assert shape.kv_bytes_per_token == 2 * 4 * 2 * 32 * 2


def test_prefill_is_compute_bound_and_superlinear():
    roofline = _h100_70b(tensor_parallel=8, allreduce_latency_s=0.0, step_overhead_s=0.0)
    model = roofline.model
    n = 16_384
    flops = 2 * model.active_layer_params * n + 2 * model.lm_head_params
    flops += 4 * 80 * 64 * 128 * n * n / 2
    comm = 2 * 80 * (2 * 7 / 8 * n * 8192 * 2) / 900e9
    assert roofline.prefill_seconds(n, 0) == pytest.approx(flops / (8 * 989e12 * 0.5) + comm)
    # Attention makes twice the tokens cost more than twice the time.
    assert roofline.prefill_seconds(2 * n, 0) > 2.05 * roofline.prefill_seconds(n, 0)
    # A cached prefix saves the linear work but its tokens are still attended.
    assert roofline.prefill_seconds(n, n) < roofline.prefill_seconds(2 * n, 0)
    assert roofline.prefill_seconds(n, n) > roofline.prefill_seconds(n, 0)


def test_short_prefill_and_decode_are_memory_bound():
    roofline = _h100_70b(tensor_parallel=8, allreduce_latency_s=0.0, step_overhead_s=0.0)
    # Streamed weights: all but the input embedding table (a row lookup).
    streamed = roofline.weight_bytes - 2 * 128256 * 8192
    hbm = 8 * 3350e9 * 0.8
    comm_one = 2 * 80 * (2 * 7 / 8 * 8192 * 2) / 900e9
    assert roofline.prefill_seconds(1, 0) == pytest.approx(
        (streamed + 327_680) / hbm + comm_one, rel=1e-9
    )
    context = 32 * 4000
    expected = (streamed + 327_680 * context) / hbm + 32 * comm_one
    assert roofline.decode_step_seconds(32, context) == pytest.approx(expected, rel=1e-9)
    assert roofline.decode_step_seconds(0, 0) == 0.0


def test_moe_decode_reads_only_the_touched_experts():
    roofline = RooflineCostModel(
        gpu=gpu_preset("h200"), model=model_preset("mixtral-8x7b"), step_overhead_s=0.0
    )
    model = roofline.model
    experts = 32 * 8 * model.mlp_params
    streamed = model.num_params - model.lm_head_params  # input embedding: a lookup
    hbm = 4800e9 * 0.8
    # One token touches 2 of 8 experts per layer; 64 tokens touch (nearly) all of them.
    one = roofline.decode_step_seconds(1, 0)
    assert one == pytest.approx((streamed - experts * 6 / 8) * 2 / hbm, rel=1e-9)
    many = roofline.decode_step_seconds(64, 0)
    assert many == pytest.approx((streamed - experts * 0.75**64) * 2 / hbm, rel=1e-9)


def test_transfer_and_capacity_numbers():
    roofline = _h100_70b(tensor_parallel=8)
    assert roofline.transfer_bandwidth_bytes_per_s == pytest.approx(8 * 50e9 * 0.8)
    assert roofline.transfer_seconds(10_000) == pytest.approx(10_000 * 327_680 / 320e9)
    assert roofline.kv_block_bytes(512) == 512 * 327_680
    expected = int((8 * 80e9 * 0.9 - roofline.weight_bytes) // (512 * 327_680))
    assert roofline.kv_capacity_blocks(512) == expected
    with pytest.raises(ValueError, match="raise tensor_parallel"):
        _h100_70b(tensor_parallel=1).kv_capacity_blocks(512)


@pytest.mark.parametrize("gpu", sorted(GPU_PRESETS))
def test_step_cost_model_tracks_the_roofline(gpu):
    roofline = RooflineCostModel(
        gpu=gpu_preset(gpu), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    linear = roofline.step_cost_model()
    assert isinstance(linear, StepCostModel)
    for n, cached in ((2048, 0), (8192, 0), (8192, 16384), (65536, 0)):
        assert linear.prefill_seconds(n, cached) == pytest.approx(
            roofline.prefill_seconds(n, cached), rel=0.1
        )
    for batch, context in ((1, 4096), (16, 16 * 8192), (64, 64 * 4096)):
        assert linear.decode_step_seconds(batch, context) == pytest.approx(
            roofline.decode_step_seconds(batch, context), rel=0.1
        )
    prefill_error, decode_error = roofline.linearization_error()
    assert prefill_error < 0.25 and decode_error < 0.15


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="gpu: expected one of"):
        gpu_preset("v100")
    with pytest.raises(ValueError, match="model: expected one of"):
        model_preset("gpt-5")
    with pytest.raises(ValueError, match="mfu"):
        _h100_70b(mfu=1.5)
    with pytest.raises(ValueError, match="tensor_parallel"):
        _h100_70b(tensor_parallel=0)
    with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
        ModelShape(
            name="x",
            num_layers=1,
            hidden_size=8,
            num_heads=3,
            num_kv_heads=2,
            head_dim=2,
            intermediate_size=8,
            vocab_size=8,
        )
