"""The speculation controller: acceptance tracking, measured step costs, the scheduler's hook."""

from __future__ import annotations

import pytest

from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import (
    AcceptanceTracker,
    LinearTimingFit,
    SpeculationController,
)
from raycake.policies.speculation import (
    SpecCostView,
    SpecRequestView,
    expected_emitted_tokens,
    goodput,
)


def test_acceptance_tracker_prior_then_history():
    tracker = AcceptanceTracker(prior_rate=0.6, prior_weight=4.0, decay=0.8, learn_prior=False)
    assert tracker.acceptance_rate("new") == 0.6
    assert tracker.mean_emitted_tokens("new") is None
    assert len(tracker) == 0  # queries do not create state
    for _ in range(20):
        tracker.observe("good", num_draft_tokens=4, num_accepted=4)
        tracker.observe("bad", num_draft_tokens=4, num_accepted=0)
    assert tracker.acceptance_rate("good") > 0.95
    assert tracker.acceptance_rate("bad") < 0.05
    assert tracker.mean_emitted_tokens("good") == pytest.approx(5.0, rel=1e-2)
    # By hand: one step accepting 2 of 4 from the prior (2.4 accepted, 1.6 rejected).
    tracker.observe("one", 4, 2)
    assert tracker.acceptance_rate("one") == pytest.approx((0.8 * 2.4 + 2) / (0.8 * 4 + 2 + 1))
    tracker.observe("one", 0, 0)  # no drafts: no evidence
    assert tracker.acceptance_rate("one") == pytest.approx((0.8 * 2.4 + 2) / (0.8 * 4 + 3))
    assert tracker.view("one", tokens_left=7) == SpecRequestView(
        "one", tracker.acceptance_rate("one"), 7
    )
    tracker.forget("one")
    assert tracker.acceptance_rate("one") == 0.6


def test_linear_timing_fit_recovers_a_line():
    fit = LinearTimingFit(decay=1.0)
    assert fit.fit() is None and fit.mean_seconds is None
    fit.observe(8, 0.01 + 8 * 2e-4)
    assert fit.fit() is None  # one size: no slope yet
    assert fit.mean_seconds == pytest.approx(0.0116)
    for size in (1, 16, 64, 256):
        fit.observe(size, 0.01 + size * 2e-4)
    fixed, slope = fit.fit()
    assert fixed == pytest.approx(0.01) and slope == pytest.approx(2e-4)
    # Timings that fall with size: the slope is clamped at 0.
    falling = LinearTimingFit()
    falling.observe(1, 0.02)
    falling.observe(10, 0.01)
    assert falling.fit()[1] == 0.0


def test_controller_hook_decides_and_reports():
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="head", policy="fixed", num_draft_tokens=3)
    )
    assert controller.budget_for(["a", "b"]) == {"a": 3, "b": 3}
    metrics = controller.metrics()
    assert metrics["spec_draft_tokens"] == 6.0
    assert metrics["spec_policy_steps"] == 1.0 and metrics["spec_policy_speculating_steps"] == 1.0


def test_adaptive_controller_follows_measured_costs_and_acceptance():
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="head", policy="adaptive", num_draft_tokens=8)
    )
    # Measured: a compute-bound target (5 ms + 0.2 ms per token) and 1 ms draft steps.
    for tokens in (1, 4, 16, 64, 256, 1024):
        controller.observe_target_step(tokens, 0.005 + tokens * 2e-4)
        controller.observe_drafting(4, 1, 0.004)
    cost = controller.cost()
    assert cost.target_fixed_s == pytest.approx(0.005, rel=1e-6)
    assert cost.target_per_token_s == pytest.approx(2e-4, rel=1e-6)
    for _ in range(10):
        controller.observe_verify("good", 4, 4)
        controller.observe_verify("bad", 4, 0)
    assert controller.budget_for(["good"])["good"] >= 3
    assert controller.budget_for(["bad"])["bad"] == 0
    many = [f"r{i}" for i in range(128)]
    assert set(controller.budget_for(many).values()) == {0}
    assert controller.last_decision.num_speculating == 0
    assert controller.metrics()["spec_num_speculating"] == 0.0
    controller.forget("good")
    assert controller.tracker.acceptance_rate("good") == controller.tracker.current_prior_rate


def test_new_requests_start_from_the_acceptance_of_earlier_ones():
    tracker = AcceptanceTracker(prior_rate=0.6, prior_weight=4.0, decay=0.8, prior_decay=1.0)
    assert tracker.current_prior_rate == 0.6
    for _ in range(4):
        tracker.observe("old", 5, 5)  # 20 accepted, no rejection
    # All requests' counts: the prior's 2.4 / 1.6 plus 20 / 0.
    assert tracker.current_prior_rate == pytest.approx(22.4 / 24.0)
    assert tracker.acceptance_rate("new") == pytest.approx(22.4 / 24.0)
    tracker.observe("new", 4, 1)  # its own counts start from that prior, weight 4
    start = 4 * 22.4 / 24.0
    assert tracker.acceptance_rate("new") == pytest.approx((0.8 * start + 1) / (0.8 * 4.0 + 1 + 1))


def test_adaptive_controller_probes_after_a_long_quiet_spell():
    """Measured costs that make drafting a loss keep the policy quiet; every explore_every-th
    quiet step one request in turn gets the probe budget, so fresh evidence can switch it back."""
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="h", policy="adaptive", num_draft_tokens=8, max_depth=5)
    )
    assert (controller.explore_every, controller.probe_tokens) == (256, 2)
    controller.explore_every, controller.probe_tokens = 32, 5
    for tokens in (1, 8, 64):  # drafts cost as much as target steps: never worth it
        controller.observe_target_step(tokens, 0.001 * tokens)
    for _ in range(5):  # enough drafting steps for the measured cost to be trusted alone
        controller.observe_drafting(1, 1, 0.01)
    ids = ["a", "b"]
    probes = []
    for step in range(1, 97):
        budgets = controller.budget_for(ids)
        if any(budgets.values()):
            probes.append((step, budgets))
    assert probes == [(32, {"a": 5, "b": 0}), (64, {"a": 0, "b": 5}), (96, {"a": 5, "b": 0})]
    assert controller.num_probe_steps == 3 and controller.num_speculating_steps == 3
    assert controller.metrics()["spec_policy_probe_steps"] == 3.0
    # The fixed policy decides without measurements: it never probes.
    fixed = SpeculationController.from_config(SpeculativeConfig(draft_model="h", policy="off"))
    assert fixed.explore_every is None


def test_drafting_cost_is_a_setup_plus_a_cost_per_depth():
    """Trees of several depths fit setup + per_depth x depth; the policy then pays the setup once
    per step, so a deep chain is not priced as depth x (setup + per_depth)."""
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="h", policy="adaptive", num_draft_tokens=6, max_depth=6)
    )
    controller.observe_drafting(2, 1, 0.005)  # one depth only: its mean per depth, no setup
    # One measurement is trusted a quarter (MIN_DRAFT_OBSERVATIONS = 4); the prior (0, 1 ms)
    # keeps the rest.
    assert controller.cost().draft_setup_s == 0.0
    assert controller.cost().draft_fixed_s == pytest.approx(0.25 * 0.0025 + 0.75 * 0.001)
    for depth in (1, 2, 4, 6):
        controller.observe_drafting(depth, 1, 0.003 + 0.001 * depth)
    cost = controller.cost()
    assert cost.draft_setup_s == pytest.approx(0.003, rel=1e-3)
    assert cost.draft_fixed_s == pytest.approx(0.001, rel=1e-3)
    views = [SpecRequestView("r", 0.9)]
    assert goodput(views, [6], cost) == pytest.approx(
        expected_emitted_tokens(0.9, 6) / (cost.target_seconds(7) + 0.003 + 6 * 0.001), rel=1e-3
    )
    with pytest.raises(ValueError, match="depth: expected an integer >= 1"):
        controller.observe_drafting(0, 1, 0.001)


def test_controller_cost_before_and_after_one_size():
    prior = SpecCostView(target_fixed_s=0.01, target_per_token_s=1e-4, draft_fixed_s=0.002)
    controller = SpeculationController(
        SpeculationController.from_config(SpeculativeConfig(draft_model="h")).policy,
        prior_cost=prior,
    )
    assert controller.cost() == prior
    controller.observe_target_step(10, 0.05)  # slower machine: level from the measurement
    assert controller.cost().target_seconds(10) == pytest.approx(0.05)
    assert controller.cost().target_per_token_s == prior.target_per_token_s


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: AcceptanceTracker(decay=0), "decay"),
        (lambda: AcceptanceTracker(prior_rate=2), "prior_rate"),
        (lambda: AcceptanceTracker().observe("x", 2, 3), "num_accepted"),
        (lambda: LinearTimingFit().observe(4, 0.0), "seconds"),
    ],
)
def test_bad_inputs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_view_is_a_request_view():
    assert isinstance(AcceptanceTracker().view("x"), SpecRequestView)


def test_depth_acceptance_follows_runs_of_accepted_drafts():
    """First drafts rejected half the time, later ones almost never once reached: the per-depth
    rates show it, and the policy's expected gain of deep drafts follows them (not alpha**j)."""
    tracker = AcceptanceTracker(prior_rate=0.6, prior_weight=4.0, decay=1.0, prior_decay=1.0)
    assert tracker.depth_acceptance("r") == ()
    for _ in range(50):
        tracker.observe("r", 6, 6)  # the whole chain
        tracker.observe("r", 6, 0)  # the first draft rejected
    # Depth 1: reached 100 times, accepted 50; depths 2..6: reached 50 times, all accepted.
    shared = [(50 + 0.6) / 101] + [(50 + 0.6) / 51] * 5
    rates = tracker.depth_acceptance("r")
    for got, own, all_ in zip(rates, [50 / 100] + [1.0] * 5, shared, strict=True):
        own_accepted, own_reached = (50, 100) if own == 0.5 else (50, 50)
        assert got == pytest.approx((own_accepted + 4 * all_) / (own_reached + 4))
    # A newcomer starts from all requests' per-depth rates.
    assert tracker.depth_acceptance("new") == pytest.approx(tuple(shared))
    view = tracker.view("r")
    assert view.depth_acceptance == rates
    # The geometric rate overprices the first draft and underprices deep ones.
    alpha, gains = view.acceptance_rate, view.draft_gains(6)
    assert gains[0] < 0.6 < alpha and gains[-1] > alpha**6
    assert view.expected_emitted(6) == pytest.approx(1 + sum(view.draft_gains(6)))
    learned_off = AcceptanceTracker(learn_prior=False)
    learned_off.observe("r", 4, 2)
    assert learned_off.view("r").depth_acceptance == ()


def test_early_probes_while_the_draft_cost_rests_on_few_measurements():
    """One slow first drafting step (cold caches) must not keep speculation off: the prior
    keeps a share until four are measured, and quiet probes come every 16 steps until then."""
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="h", policy="adaptive", num_draft_tokens=4, max_depth=4)
    )
    for tokens in (1, 8, 64):
        controller.observe_target_step(tokens, 0.001 * tokens)
    controller.observe_drafting(2, 1, 1.0)  # absurdly slow
    probes = [step for step in range(1, 49) if any(controller.budget_for(["a"]).values())]
    assert probes == [16, 32, 48]


def test_adaptive_controller_runs_a_plain_step_to_measure_the_cost_per_token():
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="h", policy="adaptive", num_draft_tokens=4, max_depth=4)
    )
    for _ in range(10):
        controller.observe_verify("a", 4, 4)
    plain_steps = []
    for step in range(1, 21):
        budgets = controller.budget_for(["a"])
        if budgets == {"a": 0}:
            plain_steps.append(step)
        # A verify step pays 1 ms more than its tokens (masks, verification).
        drafts = budgets["a"]
        seconds = 0.003 + 0.0005 * (1 + drafts) + (0.001 if drafts else 0.0)
        controller.observe_target_step(1 + drafts, seconds, drafting=drafts > 0)
    assert plain_steps[0] == 8  # the 8th step in a row with drafts runs plain
    # Each line at a single size, through its own mean (slope: the prior's 1e-5).
    cost = controller.cost()
    assert cost.step_seconds(1, drafting=False) == pytest.approx(0.0035, rel=1e-6)
    assert cost.step_seconds(5, drafting=True) == pytest.approx(0.0065, rel=1e-6)
    assert controller.metrics()["spec_policy_plain_probe_steps"] == len(plain_steps) == 1


def test_a_quiet_decision_is_reused_until_a_request_joins():
    controller = SpeculationController.from_config(
        SpeculativeConfig(draft_model="h", policy="adaptive", num_draft_tokens=4, max_depth=4)
    )
    controller.explore_every = None
    for tokens in (1, 8, 64):  # drafts cost as much as target steps: never worth it
        controller.observe_target_step(tokens, 0.001 * tokens)
    decisions = []
    real_decide = controller.policy.decide

    def counting(views, cost):
        decisions.append(len(views))
        return real_decide(views, cost)

    controller.policy.decide = counting
    for _ in range(10):
        assert controller.budget_for(["a", "b"]) == {"a": 0, "b": 0}
    assert decisions == [2, 2]  # decided, reused 8 times, decided again
    assert controller.budget_for(["a"]) == {"a": 0}  # a request left: still reused
    controller.budget_for(["a", "c"])  # one joined: decided afresh
    assert decisions == [2, 2, 2]
    assert controller.num_steps == 12


def test_a_request_shut_out_by_bad_luck_drifts_back_to_the_shared_rates():
    tracker = AcceptanceTracker(prior_rate=0.6, prior_weight=4.0, decay=0.8, prior_decay=1.0)
    for i in range(20):
        tracker.observe(f"good{i}", 4, 4)
    tracker.observe("unlucky", 4, 0)
    tracker.observe("unlucky", 4, 0)
    shared = tracker.depth_acceptance("new")[0]
    assert tracker.depth_acceptance("unlucky")[0] < shared - 0.2
    for _ in range(20):  # steps without drafts
        tracker.relax("unlucky")
    assert tracker.depth_acceptance("unlucky")[0] == pytest.approx(shared, abs=0.01)
    tracker.relax("never-seen")  # no state: nothing to do
    assert len(tracker) == 21
