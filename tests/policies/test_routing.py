"""Routing policies: transformers' Switch router for parity, hand-built logits for the rest."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
    load_balancing_loss_func,
    router_z_loss_func,
)

from raycake.policies.routing import (
    ROUTERS,
    HashRouter,
    Router,
    SwitchTop1Router,
    TopKRouter,
    make_router,
)


def one_hot_logits(choices: list[int], num_experts: int) -> torch.Tensor:
    """Logits whose argmax is ``choices[t]`` for token t."""
    logits = torch.zeros(len(choices), num_experts)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 3.0
    return logits


@pytest.mark.parametrize("expert_capacity", [1, 3, 64])
def test_switch_router_matches_transformers(expert_capacity):
    torch.manual_seed(0)
    batch, seq, d_model, num_experts = 3, 24, 16, 4
    config = SwitchTransformersConfig(
        d_model=d_model,
        num_experts=num_experts,
        expert_capacity=expert_capacity,
        router_jitter_noise=0.5,  # large on purpose: it must be off in eval
    )
    theirs = SwitchTransformersTop1Router(config).eval()
    hidden = torch.randn(batch, seq, d_model)
    dispatch, top_prob, logits = theirs(hidden.clone())  # [B, S, E], [B, S, 1], [B, S, E]
    again, _, _ = theirs(hidden.clone())
    assert torch.equal(dispatch, again), "jitter noise must be off in eval"

    # Ours routes their logits (tests/model/test_moe.py copies the classifier weight instead).
    ours = SwitchTop1Router(expert_capacity=expert_capacity)
    for b in range(batch):  # NOTE: transformers' capacity counts per sequence
        result = ours.route(logits[b].detach())
        their_kept = dispatch[b].sum(-1) > 0  # [S]: a dropped token's row is all zeros
        assert torch.equal(result.expert_indices[:, 0], logits[b].argmax(-1))
        assert torch.equal(result.kept[:, 0], their_kept)
        assert torch.equal(result.expert_indices[their_kept, 0], dispatch[b].argmax(-1)[their_kept])
        torch.testing.assert_close(result.gates[their_kept, 0], top_prob[b, their_kept, 0])
        assert torch.all(result.gates[~their_kept] == 0)
        assert int(result.num_dropped) == seq - int(their_kept.sum())
        # Their losses over one sequence are the same formulas.
        expected_aux = load_balancing_loss_func(
            logits[b : b + 1].softmax(-1), logits[b : b + 1].argmax(-1)
        )
        torch.testing.assert_close(result.aux_loss, expected_aux)
        torch.testing.assert_close(result.z_loss, router_z_loss_func(logits[b : b + 1]))
    if expert_capacity == 1:
        assert not torch.all(dispatch.sum(-1) > 0), "the test should exercise drops"


def test_capacity_drops_by_hand():
    # 10 tokens, 4 experts, factor 1.0 -> capacity ceil(10 / 4) = 3 per expert.
    choices = [0, 0, 1, 0, 0, 2, 0, 1, 1, 1]
    router = SwitchTop1Router(capacity_factor=1.0)
    assert router.capacity(10, 4) == 3
    result = router.route(one_hot_logits(choices, 4))
    # Expert 0 takes tokens 0, 1, 3 and drops 4, 6; expert 1 takes 2, 7, 8 and drops 9.
    assert result.kept[:, 0].tolist() == [1, 1, 1, 1, 0, 1, 0, 1, 1, 0]
    assert result.tokens_per_expert.tolist() == [3, 3, 1, 0]
    assert int(result.num_dropped) == 3
    assert result.gates[[4, 6, 9], 0].tolist() == [0.0, 0.0, 0.0]
    # A factor of 2.0 -> capacity 5: expert 0's five tokens all fit.
    assert (
        int(SwitchTop1Router(capacity_factor=2.0).route(one_hot_logits(choices, 4)).num_dropped)
        == 0
    )


def test_dropless_modes_drop_nothing():
    choices = [2] * 50 + [0]
    logits = one_hot_logits(choices, 4)
    for router in (
        SwitchTop1Router(capacity_factor=None),
        SwitchTop1Router(capacity_factor=1.0, drop_tokens=False),
        TopKRouter(top_k=2),
    ):
        result = router.route(logits)
        assert bool(result.kept.all()) and int(result.num_dropped) == 0
        assert int(result.tokens_per_expert.sum()) == 51 * router.top_k
    assert SwitchTop1Router(capacity_factor=None).capacity(51, 4) is None


def test_topk_capacity_prefers_first_choices():
    # The GShard order the capacity helper uses: all first choices, then second choices.
    from raycake.policies.routing import capacity_mask

    indices = torch.tensor([[0, 1], [1, 0], [0, 1]])  # [T=3, k=2]
    kept = capacity_mask(indices, num_experts=2, capacity=2)
    # Expert 0 queue: t0 (1st), t2 (1st), t1 (2nd, dropped); expert 1: t1, t0, t2 (2nd, dropped).
    assert kept.tolist() == [[True, True], [True, False], [True, False]]


def test_aux_and_z_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [4.0, 1.0]])
    result = SwitchTop1Router(capacity_factor=None).route(logits)
    probs = logits.softmax(-1)
    # argmax: 0, 0 (tie -> first), 1, 0 -> f = [3/4, 1/4]
    f = torch.tensor([0.75, 0.25])
    expected_aux = 2 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(result.aux_loss, expected_aux)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in logits.tolist()]
    expected_z = sum(v * v for v in lse) / 4
    assert result.z_loss.item() == pytest.approx(expected_z, rel=1e-6)
    # A perfectly balanced uniform router scores exactly 1 (k for top-k).
    uniform = torch.zeros(4, 4)
    uniform_top2 = TopKRouter(top_k=2).route(uniform)
    assert uniform_top2.aux_loss.item() == pytest.approx(2.0)


def test_topk_renormalises_over_the_chosen_experts():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    probs = logits.softmax(-1)[0]
    result = TopKRouter(top_k=2).route(logits)
    assert result.expert_indices.tolist() == [[2, 1]]
    torch.testing.assert_close(result.gates[0], probs[[2, 1]] / probs[[2, 1]].sum())
    raw = TopKRouter(top_k=2, renormalize=False).route(logits)
    torch.testing.assert_close(raw.gates[0], probs[[2, 1]])
    assert result.gates.dtype == torch.float32 and result.expert_indices.dtype == torch.long
    # Half-precision logits still route in float32.
    assert TopKRouter(top_k=2).route(logits.bfloat16()).gates.dtype == torch.float32


def test_hash_router_is_deterministic_and_ignores_logits():
    router = HashRouter(num_experts=8)
    token_ids = torch.arange(1000)
    a = router.route(torch.randn(1000, 8), token_ids)
    b = router.route(torch.randn(1000, 8), token_ids)
    assert torch.equal(a.expert_indices, b.expert_indices)
    assert torch.equal(a.expert_indices[:, 0], HashRouter(8).expert_of(token_ids))
    assert bool((a.gates == 1).all()) and int(a.num_dropped) == 0
    # A fixed baseline, but not a degenerate one: every expert gets a fair share.
    assert int(a.tokens_per_expert.min()) > 1000 / 8 / 2
    with pytest.raises(ValueError, match="needs token ids"):
        router.route(torch.randn(4, 8))


def test_routers_are_chosen_by_config_name():
    assert set(ROUTERS) == {"switch", "topk", "hash"}
    assert isinstance(make_router("topk", top_k=2), TopKRouter)
    assert make_router("switch", capacity_factor=1.25).capacity(8, 4) == 3
    assert isinstance(make_router("hash", num_experts=4), Router)
    with pytest.raises(
        ValueError, match=r"moe\.router: expected one of \['hash', 'switch', 'topk'\]"
    ):
        make_router("expert_choice")
    with pytest.raises(ValueError, match=r"moe\.capacity_factor"):
        SwitchTop1Router(capacity_factor=0.0)
    with pytest.raises(ValueError, match=r"moe\.top_k"):
        TopKRouter(top_k=5).route(torch.zeros(2, 4))
