"""The roofline cost model against figures derived here, independently of the code's constants:
parameter counts summed by hand from the models' published config.json shapes (checked against
the published totals), KV bytes per token, FLOPs per token (2 x parameters, plus attention as
Chinchilla's appendix F counts it), and the vendors' datasheet peaks."""

from __future__ import annotations

import pytest

from raycake.model.config import ModelConfig
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.roofline import (
    GPU_PRESETS,
    ModelShape,
    RooflineCostModel,
    gpu_preset,
    model_preset,
)

# --- Datasheets (dense BF16 tensor-core FLOP/s, i.e. half the "with sparsity" figure) -------
H100_SXM = {"flops": 989.4e12, "hbm_bytes_per_s": 3.35e12, "hbm_bytes": 80e9, "nvlink": 900e9}
H200_SXM = {"flops": 989.4e12, "hbm_bytes_per_s": 4.8e12, "hbm_bytes": 141e9, "nvlink": 900e9}
A800_SXM = {"flops": 312e12, "hbm_bytes_per_s": 2.039e12, "hbm_bytes": 80e9, "nvlink": 400e9}

# --- Parameter counts from config.json, matrix by matrix --------------------------------------
# Meta-Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads of 128, MLP 14336, vocab 128256.
L3_8B_ATTENTION = 4096 * 4096 + 2 * (4096 * 8 * 128) + 4096 * 4096  # q, k, v, o
L3_8B_MLP = 3 * 4096 * 14336  # gate, up, down
L3_8B_NORMS = 2 * 4096  # input and post-attention RMSNorm
L3_8B_EMBEDDING = 128256 * 4096  # the input table; lm_head is the same size, untied
L3_8B_LAYERS = 32 * (L3_8B_ATTENTION + L3_8B_MLP + L3_8B_NORMS)
L3_8B_TOTAL = L3_8B_LAYERS + 2 * L3_8B_EMBEDDING + 4096  # + final norm
# Meta-Llama-3-70B: hidden 8192, 80 layers, 64 heads, 8 KV heads of 128, MLP 28672.
L3_70B_ATTENTION = 8192 * 8192 + 2 * (8192 * 8 * 128) + 8192 * 8192
L3_70B_MLP = 3 * 8192 * 28672
L3_70B_EMBEDDING = 128256 * 8192
L3_70B_LAYERS = 80 * (L3_70B_ATTENTION + L3_70B_MLP + 2 * 8192)
L3_70B_TOTAL = L3_70B_LAYERS + 2 * L3_70B_EMBEDDING + 8192
# Mixtral-8x7B: Llama-3-8B's attention shape, 8 experts (each a 14336 SwiGLU) in every layer,
# a 4096 x 8 router, top-2; vocab 32000.
MIXTRAL_EXPERT = 3 * 4096 * 14336
MIXTRAL_EMBEDDING = 32000 * 4096
MIXTRAL_LAYER_SHARED = L3_8B_ATTENTION + 4096 * 8 + 2 * 4096  # attention, router, norms
MIXTRAL_TOTAL = 32 * (MIXTRAL_LAYER_SHARED + 8 * MIXTRAL_EXPERT) + 2 * MIXTRAL_EMBEDDING + 4096
MIXTRAL_ACTIVE = 32 * (MIXTRAL_LAYER_SHARED + 2 * MIXTRAL_EXPERT) + 2 * MIXTRAL_EMBEDDING + 4096

BF16 = 2  # bytes


def _ideal(gpu: str, model: str, **kwargs) -> RooflineCostModel:
    """Peak rates, no overheads: the roofline itself."""
    options = {
        "mfu": 1.0,
        "bandwidth_efficiency": 1.0,
        "step_overhead_s": 0.0,
        "allreduce_latency_s": 0.0,
    }
    return RooflineCostModel(gpu=gpu_preset(gpu), model=model_preset(model), **options | kwargs)


def test_hand_counts_are_the_published_sizes():
    # Guards the figures below: the exact totals Hugging Face reports for these checkpoints.
    assert L3_8B_TOTAL == 8_030_261_248
    assert L3_70B_TOTAL == 70_553_706_496
    assert MIXTRAL_TOTAL == 46_702_792_704
    assert abs(MIXTRAL_ACTIVE / 12.9e9 - 1) < 0.002  # "12.9B active parameters"


def test_model_shapes_match_the_hand_counts():
    # The presets leave out only the RMSNorm weights (under 0.01% of the weights).
    for name, total in (
        ("llama3-8b", L3_8B_TOTAL),
        ("llama3-70b", L3_70B_TOTAL),
        ("mixtral-8x7b", MIXTRAL_TOTAL),
    ):
        assert model_preset(name).num_params == pytest.approx(total, rel=1e-4), name
    mixtral = model_preset("mixtral-8x7b")
    assert mixtral.active_layer_params + mixtral.lm_head_params + MIXTRAL_EMBEDDING == (
        pytest.approx(MIXTRAL_ACTIVE, rel=1e-3)
    )
    # 2 (K and V) x layers x KV heads x head_dim x 2 bytes.
    assert model_preset("llama3-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * BF16 == 131_072
    assert model_preset("llama3-70b").kv_bytes_per_token == 2 * 80 * 8 * 128 * BF16 == 327_680
    assert model_preset("mixtral-8x7b").kv_bytes_per_token == 2 * 32 * 8 * 128 * BF16


def test_gpu_presets_are_the_datasheets():
    for name, sheet in (("h100", H100_SXM), ("h200", H200_SXM), ("a800", A800_SXM)):
        gpu = gpu_preset(name)
        assert gpu.bf16_flops == pytest.approx(sheet["flops"], rel=0.001), name
        assert gpu.hbm_bytes_per_s == pytest.approx(sheet["hbm_bytes_per_s"], rel=0.001), name
        assert gpu.hbm_bytes == pytest.approx(sheet["hbm_bytes"], rel=0.001), name
        assert gpu.nvlink_bytes_per_s == pytest.approx(sheet["nvlink"], rel=0.001), name


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


def test_long_prefill_takes_its_flops_at_peak():
    """8k-token prefill of Llama-3-8B on one H100: compute-bound, 2 x layer parameters per token,
    the lm_head for the last token only, and causal attention: per layer and query-key pair
    2 x d_attn FLOPs for QK^T and 2 x d_attn for PV, over n(n + 1) / 2 pairs."""
    n = 8192
    d_attn = 32 * 128
    layer_weights = L3_8B_LAYERS - 32 * L3_8B_NORMS
    flops = 2 * layer_weights * n + 2 * L3_8B_EMBEDDING + 32 * 4 * d_attn * n * (n + 1) / 2
    ideal = _ideal("h100", "llama3-8b")
    assert ideal.prefill_seconds(n, 0) == pytest.approx(flops / H100_SXM["flops"], rel=1e-3)
    # ~ 2 x parameters x tokens / peak: attention adds about what the lm_head saves here.
    near = 2 * L3_8B_TOTAL * n / H100_SXM["flops"]
    assert 0.95 * near < ideal.prefill_seconds(n, 0) < 1.1 * near  # 134 ms vs 133 ms
    # Reading the weights (16 GB) is 5 ms of it: the memory side does not bind.
    assert L3_8B_TOTAL * BF16 / H100_SXM["hbm_bytes_per_s"] < 0.05 * ideal.prefill_seconds(n, 0)
    # At default settings it runs at half the peak (mfu 0.5) plus a 2 ms step overhead.
    default = RooflineCostModel(gpu=gpu_preset("h100"), model=model_preset("llama3-8b"))
    assert default.prefill_seconds(n, 0) == pytest.approx(
        flops / (0.5 * H100_SXM["flops"]) + 0.002, rel=1e-3
    )
    # Attention makes twice the tokens cost more than twice the time, and a cached prefix
    # saves the linear work while its tokens are still attended.
    assert ideal.prefill_seconds(2 * n, 0) > 2.1 * ideal.prefill_seconds(n, 0)
    assert (
        ideal.prefill_seconds(n, 0) < ideal.prefill_seconds(n, n) < ideal.prefill_seconds(2 * n, 0)
    )


def test_decode_at_batch_one_streams_the_weights():
    """A decode step reads every weight but the input embedding (a row lookup) once: at batch 1
    and short context it takes weight bytes / HBM bandwidth, whatever else it adds."""
    context = 128
    streamed_8b = (L3_8B_TOTAL - L3_8B_EMBEDDING) * BF16  # 15.0 GB
    floor_8b = streamed_8b / H100_SXM["hbm_bytes_per_s"]  # 4.48 ms
    ideal = _ideal("h100", "llama3-8b")
    kv = context * 131_072 / H100_SXM["hbm_bytes_per_s"]
    assert ideal.decode_step_seconds(1, context) == pytest.approx(floor_8b + kv, rel=1e-4)
    default = RooflineCostModel(gpu=gpu_preset("h100"), model=model_preset("llama3-8b"))
    # 80% of the bandwidth and a 2 ms step overhead: 7.6 ms, above the floor, below 2x it.
    assert floor_8b < default.decode_step_seconds(1, context) < 2 * floor_8b
    # Llama-3-70B over 8 H100s: each GPU streams an eighth; the all-reduces add microseconds.
    streamed_70b = (L3_70B_TOTAL - L3_70B_EMBEDDING) * BF16  # 139 GB
    floor_70b = streamed_70b / (8 * H100_SXM["hbm_bytes_per_s"])  # 5.19 ms
    tp8 = _ideal("h100", "llama3-70b", tensor_parallel=8)
    assert floor_70b <= tp8.decode_step_seconds(1, context) < 1.01 * floor_70b
    # Short prefills are memory-bound the same way.
    assert floor_70b <= tp8.prefill_seconds(1, 0) < 1.01 * floor_70b
    # 32 sequences of 4k: the weights once, the whole batch's KV (43 GB), and Megatron's two
    # ring all-reduces of the hidden states per layer, 2 (p - 1) / p of them over NVLink each.
    kv_bytes = 32 * 4096 * 327_680
    allreduce = 2 * 80 * (2 * 7 / 8 * 32 * 8192 * BF16) / H100_SXM["nvlink"]  # 0.16 ms
    expected = (streamed_70b + kv_bytes) / (8 * H100_SXM["hbm_bytes_per_s"]) + allreduce
    assert tp8.decode_step_seconds(32, 32 * 4096) == pytest.approx(expected, rel=1e-3)
    assert tp8.decode_step_seconds(0, 0) == 0.0


def test_moe_decode_reads_only_the_touched_experts():
    """Mixtral on one H200: one token reads its 2 experts per layer (the active weights); a
    batch of 64 with uniform routing touches all 8 in every layer (1 - 0.75^64 ~ 1)."""
    ideal = _ideal("h200", "mixtral-8x7b")
    bandwidth = H200_SXM["hbm_bytes_per_s"]
    one = (MIXTRAL_ACTIVE - MIXTRAL_EMBEDDING) * BF16 / bandwidth  # 5.3 ms
    everything = (MIXTRAL_TOTAL - MIXTRAL_EMBEDDING) * BF16 / bandwidth  # 19.4 ms
    assert ideal.decode_step_seconds(1, 0) == pytest.approx(one, rel=1e-3)
    assert ideal.decode_step_seconds(64, 0) == pytest.approx(everything, rel=1e-3)
    # Still memory-bound at 64: its flops (2 x active x 64) take a tenth of that.
    assert 2 * MIXTRAL_ACTIVE * 64 / H200_SXM["flops"] < 0.1 * everything


def test_transfer_and_capacity_numbers():
    roofline = RooflineCostModel(
        gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), tensor_parallel=8
    )
    # One 400 Gb/s NIC per GPU (50 GB/s) at the default 80% link efficiency.
    assert roofline.transfer_bandwidth_bytes_per_s == pytest.approx(8 * 50e9 * 0.8)
    assert roofline.transfer_seconds(10_000) == pytest.approx(10_000 * 327_680 / 320e9)
    assert roofline.kv_block_bytes(512) == 512 * 327_680
    # 90% of 8 x 80 GB, less 141 GB of weights, in 512-token blocks of KV: ~2,592 blocks.
    free = 8 * H100_SXM["hbm_bytes"] * 0.9 - L3_70B_TOTAL * BF16
    assert roofline.kv_capacity_blocks(512) == pytest.approx(free / (512 * 327_680), abs=1)
    with pytest.raises(ValueError, match="raise tensor_parallel"):
        RooflineCostModel(
            gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), tensor_parallel=1
        ).kv_capacity_blocks(512)


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
    def h100_70b(**kwargs) -> RooflineCostModel:
        return RooflineCostModel(gpu=gpu_preset("h100"), model=model_preset("llama3-70b"), **kwargs)

    with pytest.raises(ValueError, match="gpu: expected one of"):
        gpu_preset("v100")
    with pytest.raises(ValueError, match="model: expected one of"):
        model_preset("gpt-5")
    with pytest.raises(ValueError, match="mfu"):
        h100_70b(mfu=1.5)
    with pytest.raises(ValueError, match="tensor_parallel"):
        h100_70b(tensor_parallel=0)
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
