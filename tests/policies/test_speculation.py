"""The speculative batching policies over hand-built acceptance and cost numbers.

Shared costs (a small model on one accelerator): a target step costs 10 ms + 0.05 ms per query
token (memory-bound at small batches, compute-bound at large ones); a draft step 1 ms.
    batch 1, alpha 0.8, plain:  1 token / 10.05 ms                       =  99.5 tok/s
    batch 1, alpha 0.8, k = 4:  3.3616 tokens / (10.25 + 4 x 1) ms       = 235.9 tok/s
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from raycake.policies.speculation import (
    SPECULATION_POLICIES,
    SPECULATION_POLICY_NAMES,
    AdaptiveSpeculation,
    FixedSpeculation,
    NoSpeculation,
    SpecCostView,
    SpecRequestView,
    acceptance_rate_from_length,
    expected_emitted_tokens,
    goodput,
    make_speculation_policy,
    tree_shape,
)
from raycake.policies.step_cost_model import StepCostModel

COST = SpecCostView(target_fixed_s=0.010, target_per_token_s=0.05e-3, draft_fixed_s=0.001)


def batch(n: int, alpha: float, tokens_left: int | None = None) -> list[SpecRequestView]:
    return [SpecRequestView(f"r{i}", alpha, tokens_left) for i in range(n)]


def test_expected_emitted_tokens_geometric_series():
    assert expected_emitted_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert expected_emitted_tokens(0.0, 5) == 1.0
    assert expected_emitted_tokens(1.0, 5) == 6.0
    assert expected_emitted_tokens(0.5, 0) == 1.0


def test_acceptance_rate_from_length_inverts_the_model():
    # Spec-Bench: EAGLE on Vicuna-7B accepts 3.58 tokens per step; as a chain of 5 drafts:
    alpha = acceptance_rate_from_length(3.58, 5)
    assert expected_emitted_tokens(alpha, 5) == pytest.approx(3.58, abs=1e-9)
    assert acceptance_rate_from_length(1.0, 3) == pytest.approx(0.0, abs=1e-9)


def test_goodput_by_hand():
    assert goodput(batch(1, 0.8), [0], COST) == pytest.approx(1 / 0.01005)
    assert goodput(batch(1, 0.8), [4], COST) == pytest.approx(3.3616 / 0.01425)
    # Draft steps run over the requests still drafting: depths 1-2 both, depth 3 only one.
    cost = SpecCostView(
        target_fixed_s=0.01, target_per_token_s=0.0, draft_fixed_s=0.001, draft_per_seq_s=0.002
    )
    two = batch(2, 0.5)
    seconds = 0.01 + 2 * (0.001 + 2 * 0.002) + (0.001 + 0.002)
    emitted = expected_emitted_tokens(0.5, 3) + expected_emitted_tokens(0.5, 2)
    assert goodput(two, [3, 2], cost) == pytest.approx(emitted / seconds)


def test_off_and_fixed():
    requests = [*batch(2, 0.9), SpecRequestView("short", 0.9, tokens_left=2)]
    off = NoSpeculation().decide(requests)
    assert off.draft_tokens == {"r0": 0, "r1": 0, "short": 0}
    assert off.num_speculating == 0
    fixed = FixedSpeculation(4).decide(requests)
    # A request with 2 tokens left gets at most 1 draft: one step emits at most drafts + 1.
    assert fixed.draft_tokens == {"r0": 4, "r1": 4, "short": 1}
    assert fixed.total_draft_tokens == 9
    assert fixed.metrics()["spec_max_draft_tokens"] == 4.0


def test_adaptive_speculates_deep_at_batch_one_with_good_acceptance():
    decision = AdaptiveSpeculation(max_draft_tokens=8).decide(batch(1, 0.8), COST)
    k = decision.draft_tokens["r0"]
    # Brute force over every budget agrees.
    best = max(range(9), key=lambda j: goodput(batch(1, 0.8), [j], COST))
    assert k == best and k >= 4
    assert decision.predicted_speedup == pytest.approx(
        goodput(batch(1, 0.8), [k], COST) / goodput(batch(1, 0.8), [0], COST)
    )
    assert decision.predicted_speedup > 2.0
    assert "spec_predicted_speedup" in decision.metrics()


def test_adaptive_turns_off_at_large_batch_when_tokens_cost_compute():
    # Compute-bound target: each query token costs 0.2 ms once the batch is large.
    cost = SpecCostView(target_fixed_s=0.005, target_per_token_s=0.2e-3, draft_fixed_s=0.001)
    policy = AdaptiveSpeculation(max_draft_tokens=8)
    assert policy.decide(batch(1, 0.7), cost).num_speculating == 1
    large = policy.decide(batch(128, 0.7), cost)
    assert large.num_speculating == 0
    assert large.predicted_speedup == 1.0
    # Check against the model: one draft token for all would have been slower than plain.
    assert goodput(batch(128, 0.7), [1] * 128, cost) < goodput(batch(128, 0.7), [0] * 128, cost)


def test_adaptive_budget_shrinks_as_batch_grows_and_grows_with_acceptance():
    policy = AdaptiveSpeculation(max_draft_tokens=10)
    by_batch = [policy.decide(batch(n, 0.75), COST).draft_tokens["r0"] for n in (1, 8, 64, 512)]
    assert by_batch == sorted(by_batch, reverse=True)
    assert by_batch[0] > by_batch[-1]
    by_alpha = [policy.decide(batch(1, a), COST).draft_tokens["r0"] for a in (0.3, 0.6, 0.9)]
    assert by_alpha == sorted(by_alpha)
    assert by_alpha[0] < by_alpha[-1]


def test_adaptive_gives_poor_acceptors_less_in_a_mixed_batch():
    # The step's goodput is ~1,200 tok/s, so a draft token's price is 1200 x 0.05 ms = 0.06
    # expected tokens: alpha 0.1 still pays for one draft (draft steps run anyway for the
    # others), alpha 0.02 for none.
    requests = [*batch(4, 0.9), SpecRequestView("poor", 0.1), SpecRequestView("hopeless", 0.02)]
    decision = AdaptiveSpeculation().decide(requests, COST)
    assert decision.draft_tokens["r0"] >= 5
    assert decision.draft_tokens["poor"] == 1
    assert decision.draft_tokens["hopeless"] == 0


def test_adaptive_off_when_nothing_is_accepted_and_respects_tokens_left():
    policy = AdaptiveSpeculation()
    assert policy.decide(batch(1, 0.0), COST).num_speculating == 0
    assert policy.decide(batch(1, 0.95, tokens_left=3), COST).draft_tokens["r0"] <= 2
    assert policy.decide(batch(1, 0.95, tokens_left=1), COST).draft_tokens["r0"] == 0
    assert policy.decide([], COST).draft_tokens == {}


def test_adaptive_matches_brute_force_on_small_mixed_batches():
    cost = SpecCostView(
        target_fixed_s=0.004, target_per_token_s=0.1e-3, draft_fixed_s=0.5e-3, draft_per_seq_s=1e-5
    )
    requests = [SpecRequestView("a", 0.9), SpecRequestView("b", 0.6), SpecRequestView("c", 0.3)]
    decision = AdaptiveSpeculation(max_draft_tokens=5, min_relative_gain=0.0).decide(requests, cost)
    best = max(
        (goodput(requests, [i, j, k], cost), (i, j, k))
        for i in range(6)
        for j in range(6)
        for k in range(6)
    )
    assert decision.predicted_goodput == pytest.approx(best[0], rel=1e-3)


def test_cost_view_from_step_cost_model():
    model = StepCostModel(
        prefill_fixed_s=0.01,
        prefill_per_token_s=1e-4,
        prefill_per_token_pair_s=0.0,
        decode_fixed_s=0.008,
        decode_per_seq_s=2e-4,
        decode_per_context_token_s=1e-6,
    )
    view = SpecCostView.from_step_cost_model(model, total_context_tokens=1000, draft_fixed_s=0.001)
    # Plain decode of 4 sequences costs what the regression predicts.
    assert view.target_seconds(4) == pytest.approx(model.decode_step_seconds(4, 1000))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: SpecRequestView("x", 1.5), "acceptance_rate"),
        (lambda: SpecRequestView("x", math.nan), "acceptance_rate"),
        (lambda: SpecRequestView("x", 0.5, tokens_left=0), "tokens_left"),
        (
            lambda: SpecCostView(target_fixed_s=-1, target_per_token_s=0, draft_fixed_s=0),
            "target_fixed_s",
        ),
        (
            lambda: SpecCostView(target_fixed_s=0.01, target_per_token_s=0, draft_fixed_s=None),
            "draft_fixed_s",
        ),
        (lambda: FixedSpeculation(-1), "num_draft_tokens"),
        (lambda: AdaptiveSpeculation(max_draft_tokens=0), "max_draft_tokens"),
        (lambda: AdaptiveSpeculation(min_relative_gain=-0.1), "min_relative_gain"),
        (lambda: AdaptiveSpeculation().decide(batch(1, 0.5), None), "cost"),
        (lambda: NoSpeculation().decide([*batch(1, 0.5), *batch(1, 0.5)]), "distinct request ids"),
        (lambda: make_speculation_policy("eagle"), "speculation_policy"),
        (lambda: acceptance_rate_from_length(7.0, 5), "mean_emitted_tokens"),
    ],
)
def test_bad_inputs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_registry():
    assert set(SPECULATION_POLICY_NAMES) == set(SPECULATION_POLICIES)
    for name in SPECULATION_POLICY_NAMES:
        assert make_speculation_policy(name).name == name
    assert make_speculation_policy("fixed", num_draft_tokens=3).num_draft_tokens == 3


def test_imports_without_torch_or_ray():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['ray'] = None\n"
        "import raycake.policies.speculation as s, raycake.engine.spec.controller\n"
        "print(s.AdaptiveSpeculation().decide([s.SpecRequestView('a', 0.8)], "
        "s.SpecCostView(target_fixed_s=0.01, target_per_token_s=0, draft_fixed_s=0.001)).draft_tokens)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'a'" in out.stdout


def test_tree_shape_is_a_chain_up_to_the_depth_then_widens():
    assert tree_shape(1, 6, 4) == (1, 1)
    assert tree_shape(4, 6, 4) == (4, 1)  # a chain
    assert tree_shape(6, 6, 4) == (6, 1)
    assert tree_shape(12, 6, 4) == (6, 2)
    assert tree_shape(13, 6, 4) == (6, 3)
    assert tree_shape(100, 6, 4) == (6, 4)  # never wider than tree_top_k
    with pytest.raises(ValueError, match="budget: expected an integer >= 1"):
        tree_shape(0, 6, 4)
