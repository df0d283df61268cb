"""SwitchLlamaForCausalLM: Switch top-1 MoE in every other layer, the embedded MoE model's shape."""

from __future__ import annotations

import json

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.engine.config import EngineConfig
from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.llama import LlamaForCausalLM, LlamaMLP
from raycake.model.loader import load_model, read_model_config
from raycake.model.moe import MoEFeedForward
from raycake.policies.routing import SwitchTop1Router
from tests.llama_checkpoints import SWITCH_MOE, build_raycake_checkpoint, tiny_model_config
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

VOCAB = 300


def switch_config(**overrides) -> ModelConfig:
    return tiny_model_config(
        **{"vocab_size": VOCAB, "tie_word_embeddings": True, **SWITCH_MOE, **overrides}
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("switch_llama")
    model = build_raycake_checkpoint(switch_config(), out, init_std=0.2, with_tokenizer=True)
    return out, model


def test_every_other_layer_is_a_switch_moe_layer():
    model = LlamaForCausalLM(switch_config())
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [LlamaMLP, MoEFeedForward, LlamaMLP, MoEFeedForward]
    assert model.config.num_moe_layers == 2
    router = model.model.layers[1].mlp.router
    # The checkpoint's own routing, served dropless unless the config sets a capacity.
    assert isinstance(router, SwitchTop1Router) and router.is_dropless


def test_config_json_round_trips_and_names_the_architecture(checkpoint):
    out, model = checkpoint
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["SwitchLlamaForCausalLM"]
    assert (hf["decoder_sparse_step"], hf["router_type"], hf["num_experts_per_tok"]) == (
        2,
        "switch",
        1,
    )
    assert read_model_config(out) == model.config


def test_saved_checkpoint_loads_with_identical_logits(checkpoint):
    out, model = checkpoint
    loaded = load_model(out)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        expected = model.compute_logits(model(ids, positions))
        got = loaded.compute_logits(loaded(ids, positions))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_switch_gate_scales_the_expert_output_by_its_probability(checkpoint):
    """Top-1 Switch: y = p_e(x) * E_e(x), not renormalized to 1 as top-k with k=1 would be."""
    _, model = checkpoint
    moe = model.model.layers[1].mlp
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, routing = moe(x)
        probs = (x @ moe.gate.weight.t()).softmax(-1)
        for t in range(5):
            e = int(probs[t].argmax())
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).split(48)
            expert = moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            torch.testing.assert_close(out[t], probs[t, e] * expert, rtol=1e-5, atol=1e-6)
    assert routing.num_dropped.item() == 0


def test_capacity_from_engine_config_drops_overflow_tokens(checkpoint):
    out, _ = checkpoint
    model = load_model(out, moe=MoEConfig(router="switch", capacity_factor=1.0))
    ids = torch.zeros(1, 16, dtype=torch.long)  # one token repeated: one expert gets all 16
    with torch.no_grad():
        model(ids, torch.arange(16).view(1, 16))
    routing = model.model.layers[1].last_routing
    # Capacity ceil(16 / 4 * 1.0) = 4 of 16 tokens kept by the single busy expert.
    assert routing.tokens_per_expert.tolist().count(4) == 1
    assert routing.num_dropped.item() == 12


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts_per_tok": 2}, "num_experts_per_tok"),
        ({"router_type": "expert_choice"}, "router_type"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ],
)
def test_bad_moe_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        switch_config(**overrides)


def test_greedy_tokens_are_the_same_with_experts_on_two_shards(ray_session, checkpoint):  # noqa: F811
    out, _ = checkpoint
    prompts = ["def f(x):", "return x + 1", "x"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    local = [o.token_ids for o in LLM(str(out)).generate(prompts, params)]
    config = EngineConfig(model=str(out), moe=MoEConfig(num_expert_shards=2))
    with LLM(config=config) as sharded_llm:
        assert len(sharded_llm.expert_shards) == 2
        sharded = [o.token_ids for o in sharded_llm.generate(prompts, params)]
    assert sharded == local
    assert all(len(ids) == 12 for ids in local)
