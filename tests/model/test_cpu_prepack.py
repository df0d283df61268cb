"""oneDNN-prepacked linears: same outputs as nn.Linear, the right modules swapped, ties kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raycake import LLM, SamplingParams
from raycake.assets import default_model_dir
from raycake.engine.config import EngineConfig
from raycake.kernels import cpu_kernels
from raycake.model.cpu_prepack import PrepackedLinear, can_prepack, prepack_linears
from raycake.model.int8_linear import Int8Linear
from raycake.model.loader import load_model

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.device("cpu"), torch.float32), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 3, 48), (2, 2, 48), (0, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("small_batch", [False, True])
def test_prepacked_linear_matches_nn_linear(dtype, shape, bias, small_batch):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    if small_batch:
        cpu_kernels.load()
    packed = PrepackedLinear(linear, small_batch=small_batch)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape == (*shape[:-1], 80)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_few_rows_of_small_layers_go_to_the_small_batch_kernel(monkeypatch):
    cpu_kernels.load()
    calls = []
    kernel = cpu_kernels.small_batch_linear
    monkeypatch.setattr(
        cpu_kernels, "small_batch_linear", lambda *a: calls.append(a[0].shape) or kernel(*a)
    )
    small = PrepackedLinear(nn.Linear(256, 512), small_batch=True)
    big = PrepackedLinear(nn.Linear(256, 1408), small_batch=True)  # 360K weights: oneDNN
    assert small.small_batch and not big.small_batch
    with torch.inference_mode():
        for rows in (1, 4, 5, 32):
            x = torch.randn(rows, 256)
            for layer in (small, big):
                want = F.linear(x, layer.weight, layer.bias)
                torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 256), (4, 256)]


def test_prepacked_linear_trains_through_the_plain_weight():
    linear = nn.Linear(16, 8)
    packed = PrepackedLinear(linear)
    packed(torch.randn(4, 16)).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_prepack_linears_swaps_plain_linears_and_keeps_ties():
    model = load_model(default_model_dir(), dtype="bfloat16")
    config = model.config
    swapped = prepack_linears(model)
    # qkv, o, gate_up, down per layer, and the lm_head.
    assert swapped == 4 * config.num_hidden_layers + 1
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "packed_weight" not in " ".join(model.state_dict())


def test_prepack_leaves_int8_layers_alone():
    model = load_model(default_model_dir(), quantization="int8")
    assert prepack_linears(model) == 1  # only the lm_head: the projections are Int8Linear
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * 4


def test_engine_output_is_the_same_with_and_without_prepacked_weights():
    prompts = [[5, 17, 99, 3, 250], list(range(40, 90))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = []
    for prepack in (False, True):
        llm = LLM(config=EngineConfig(prepack_weights=prepack))
        outputs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_prepack_weights_must_be_a_bool(value):
    with pytest.raises(ValueError, match="prepack_weights"):
        EngineConfig(prepack_weights=value)
