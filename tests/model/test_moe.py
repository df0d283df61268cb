"""The MoE feed-forward layer against transformers' Mixtral block and Switch router."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, SwitchTransformersConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
)

from raycake.model.moe import MoEFeedForward, MoEStats
from raycake.policies.routing import HashRouter, SwitchTop1Router, TopKRouter

HIDDEN, INTERMEDIATE = 32, 48


def mixtral_block(num_experts: int) -> MixtralSparseMoeBlock:
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():  # its weights start as torch.empty
            param.normal_(std=0.2)
    return block


@pytest.mark.parametrize("num_experts", [4, 8])
def test_matches_transformers_mixtral_block(num_experts):
    torch.manual_seed(num_experts)
    theirs = mixtral_block(num_experts)
    ours = MoEFeedForward(HIDDEN, INTERMEDIATE, num_experts, TopKRouter(top_k=2))
    # Same parameter names and layouts: their state dict loads as is.
    ours.load_state_dict(theirs.state_dict())
    hidden = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        expected = theirs(hidden)
        out, routing = ours(hidden)
        flat_out, _ = ours(hidden.view(-1, HIDDEN))
    assert out.shape == hidden.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_out, expected.view(-1, HIDDEN), atol=1e-5, rtol=1e-5)
    _, their_gates, their_indices = theirs.gate(hidden.view(-1, HIDDEN))
    assert torch.equal(routing.expert_indices, their_indices)
    torch.testing.assert_close(routing.gates, their_gates)
    assert int(routing.num_dropped) == 0 and int(routing.tokens_per_expert.sum()) == 18 * 2


def test_grouped_experts_match_a_per_token_loop():
    torch.manual_seed(1)
    ffn = MoEFeedForward(HIDDEN, INTERMEDIATE, 4, TopKRouter(top_k=2))
    x = torch.randn(7, HIDDEN)
    with torch.no_grad():
        out, routing = ffn(x)
        experts = ffn.experts
        for t in range(7):
            expected = torch.zeros(HIDDEN)
            for e, g in zip(
                routing.expert_indices[t].tolist(), routing.gates[t].tolist(), strict=True
            ):
                gate, up = (experts.gate_up_proj[e] @ x[t]).split(INTERMEDIATE)
                expected += g * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
            torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_switch_layer_drops_like_transformers_and_dropped_tokens_are_zero():
    torch.manual_seed(2)
    num_experts, seq, capacity = 4, 16, 2
    config = SwitchTransformersConfig(
        d_model=HIDDEN, num_experts=num_experts, expert_capacity=capacity
    )
    theirs = SwitchTransformersTop1Router(config).eval()
    ffn = MoEFeedForward(
        HIDDEN, INTERMEDIATE, num_experts, SwitchTop1Router(expert_capacity=capacity)
    )
    with torch.no_grad():
        ffn.gate.weight.copy_(theirs.classifier.weight)
        hidden = torch.randn(seq, HIDDEN)
        dispatch, _, _ = theirs(hidden[None].clone())  # [1, S, E]
        out, routing = ffn(hidden)
    their_kept = dispatch[0].sum(-1) > 0  # [S]
    assert torch.equal(routing.kept[:, 0], their_kept)
    assert int(routing.num_dropped) == int((~their_kept).sum()) > 0
    assert bool((out[~their_kept] == 0).all()), "the residual alone carries dropped tokens"
    assert bool((out[their_kept] != 0).any(dim=-1).all())


def test_hash_router_layer_needs_token_ids_and_stats_accumulate():
    torch.manual_seed(3)
    ffn = MoEFeedForward(HIDDEN, INTERMEDIATE, 4, HashRouter(num_experts=4))
    token_ids = torch.tensor([5, 9, 5, 2])
    with torch.no_grad():
        out, routing = ffn(torch.randn(4, HIDDEN), token_ids)
    assert routing.expert_indices[0, 0] == routing.expert_indices[2, 0]
    assert out.shape == (4, HIDDEN)

    stats = MoEStats(num_experts=4)
    stats.update(routing)
    choices = [0, 0, 0, 0, 1, 2]  # capacity ceil(6 / 4) = 2: expert 0 drops two
    logits = torch.zeros(6, 4)
    logits[torch.arange(6), torch.tensor(choices)] = 3.0
    stats.update(SwitchTop1Router(capacity_factor=1.0).route(logits))
    expected = [0, 0, 0, 0]
    for e in routing.expert_indices[:, 0].tolist():
        expected[e] += 1
    expected = [a + b for a, b in zip(expected, [2, 1, 1, 0], strict=True)]
    assert stats.tokens_per_expert == expected
    assert stats.num_assignments == 10 and stats.num_dropped == 2
    assert stats.drop_rate == pytest.approx(0.2)
    assert stats.kept_imbalance == pytest.approx(max(expected) / (8 / 4))
    # Demand counts the two dropped pairs too: expert 0 was asked for by 4 of the 6 tokens.
    assigned = [a + b for a, b in zip(expected, [2, 0, 0, 0], strict=True)]
    assert stats.assigned_per_expert == assigned
    assert stats.imbalance == pytest.approx(max(assigned) / (10 / 4))
