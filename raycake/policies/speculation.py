"""How many draft tokens each request gets in a decode step: the speculative batching policy.

Speculation trades compute for latency: a verify step runs the target over ``1 + k`` tokens per
request (plus ``k`` draft steps) and emits ``1 + accepted`` tokens. At batch 1 the target step
is bound by reading weights, so the extra tokens are nearly free; in a large batch the step is
bound by compute, every draft token costs what a real token costs, and rejected ones are waste.
A policy reads per-request acceptance (``SpecRequestView``) and measured step costs
(``SpecCostView``) and returns a ``SpeculationDecision``: a draft budget per request, 0 = plain
decoding. Policies are chosen by name: ``off``, ``fixed`` (k for everyone, like vLLM's
``num_speculative_tokens``) and ``adaptive`` (maximizes predicted goodput every step).

Acceptance model: draft token j (1-based) is accepted with probability ``alpha**j`` (each token
accepted independently with rate ``alpha`` given its predecessors were), so a budget of k gives
``E[emitted] = 1 + alpha + ... + alpha**k = (1 - alpha**(k+1)) / (1 - alpha)`` tokens per step.
With a tree of k nodes the engine does at least as well as a chain of k, so the model is
conservative there. ``raycake.engine.spec.controller.AcceptanceTracker`` fits ``alpha`` per request.
When a view carries ``depth_acceptance`` (the conditional rate at each depth: drafts that follow
accepted ones are accepted more often than the first, since easy stretches of text come in
runs), draft token j's expected gain is the product of the first j rates instead of alpha**j.

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raycake.policies.step_cost_model import StepCostModel
from raycake.validation import is_count, is_number, require

SPECULATION_POLICY_NAMES = ("adaptive", "fixed", "off")
# alpha is clamped below this: at alpha -> 1 the model would draft without bound.
MAX_ACCEPTANCE_RATE = 0.99


def expected_emitted_tokens(acceptance_rate: float, num_draft_tokens: int) -> float:
    """Tokens one verify step emits on average (accepted drafts + the target's own token)."""
    require(
        is_number(acceptance_rate) and 0.0 <= acceptance_rate <= 1.0,
        "acceptance_rate",
        "a number in [0, 1]",
        acceptance_rate,
    )
    require(is_count(num_draft_tokens, 0), "num_draft_tokens", "an integer >= 0", num_draft_tokens)
    if acceptance_rate == 1.0:
        return float(num_draft_tokens + 1)
    return (1.0 - acceptance_rate ** (num_draft_tokens + 1)) / (1.0 - acceptance_rate)


def acceptance_rate_from_length(mean_emitted_tokens: float, num_draft_tokens: int) -> float:
    """The ``alpha`` whose ``expected_emitted_tokens(alpha, k)`` is the measured mean (bisection).

    For callers that only know the mean acceptance length at a fixed k (e.g. a paper's number).
    """
    require(is_count(num_draft_tokens, 1), "num_draft_tokens", "an integer >= 1", num_draft_tokens)
    require(
        is_number(mean_emitted_tokens) and 1.0 <= mean_emitted_tokens <= num_draft_tokens + 1,
        "mean_emitted_tokens",
        f"a number in [1, {num_draft_tokens + 1}] (1 + accepted drafts)",
        mean_emitted_tokens,
    )
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_emitted_tokens(mid, num_draft_tokens) < mean_emitted_tokens:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def tree_shape(budget: int, max_depth: int, tree_top_k: int) -> tuple[int, int]:
    """(depth, width) of the draft tree for a budget of ``budget`` nodes: as deep as allowed,
    then as wide as the budget fills (EAGLE-2's top-k frontier, at most ``tree_top_k``).

    NOTE: a budget up to ``max_depth`` grows a chain, one head row per depth: when the head's
    top choice is usually right, width costs head rows and verify tokens for little gain.
    """
    for name, value in (("budget", budget), ("max_depth", max_depth), ("tree_top_k", tree_top_k)):
        require(is_count(value, 1), name, "an integer >= 1", value)
    depth = min(max_depth, budget)
    return depth, min(tree_top_k, -(-budget // depth))


# --- Views: what the engine tells the policy each step ----------------------------------------


@dataclass(frozen=True)
class SpecRequestView:
    """One running request as the policy sees it."""

    request_id: str
    # Per-draft-token acceptance rate in [0, 1] (AcceptanceTracker.acceptance_rate).
    acceptance_rate: float
    # Tokens the request may still emit (max_tokens minus generated); None: unbounded. A budget
    # never exceeds tokens_left - 1, since one step emits at most budget + 1 tokens.
    tokens_left: int | None = None
    # Entry j - 1: P(draft j accepted | drafts 1..j-1 accepted); deeper drafts use the last
    # entry. Empty: every depth at ``acceptance_rate``.
    depth_acceptance: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        require(
            is_number(self.acceptance_rate) and 0.0 <= self.acceptance_rate <= 1.0,
            f"SpecRequestView({self.request_id!r}).acceptance_rate",
            "a number in [0, 1]",
            self.acceptance_rate,
        )
        if self.tokens_left is not None:
            require(
                is_count(self.tokens_left, 1),
                f"SpecRequestView({self.request_id!r}).tokens_left",
                "an integer >= 1 or None",
                self.tokens_left,
            )
        require(
            isinstance(self.depth_acceptance, tuple)
            and all(is_number(r) and 0.0 <= r <= 1.0 for r in self.depth_acceptance),
            f"SpecRequestView({self.request_id!r}).depth_acceptance",
            "a tuple of numbers in [0, 1]",
            self.depth_acceptance,
        )

    def draft_gains(self, num_draft_tokens: int) -> list[float]:
        """Expected extra tokens from each of the first ``num_draft_tokens`` drafts: draft j is
        emitted only if it and every draft before it is accepted (nonincreasing in j)."""
        gains, reach = [], 1.0
        for j in range(num_draft_tokens):
            if self.depth_acceptance:
                rate = self.depth_acceptance[min(j, len(self.depth_acceptance) - 1)]
            else:
                rate = self.acceptance_rate
            reach *= min(rate, MAX_ACCEPTANCE_RATE)
            gains.append(reach)
        return gains

    def expected_emitted(self, num_draft_tokens: int) -> float:
        """Tokens one verify step with this budget emits on average (drafts + the bonus)."""
        return 1.0 + sum(self.draft_gains(num_draft_tokens))

    @property
    def max_useful_draft_tokens(self) -> int | None:
        return None if self.tokens_left is None else self.tokens_left - 1


@dataclass(frozen=True, kw_only=True)
class SpecCostView:
    """Measured step costs, linear in the work of the step; every coefficient >= 0.

    target_seconds(tokens) = target_fixed_s + target_per_token_s * tokens   (tokens: all query
        tokens of the step, 1 + drafts per request)
    draft_seconds(seqs)    = draft_fixed_s + draft_per_seq_s * seqs          (one draft step over
        the ``seqs`` requests still drafting; a budget of k takes k such steps)
    plus ``draft_setup_s`` once in a step in which anyone drafts (the draft model catching up
    on the tokens accepted since its last step, before the first draft step).
    """

    target_fixed_s: float
    target_per_token_s: float
    draft_fixed_s: float
    draft_per_seq_s: float = 0.0
    draft_setup_s: float = 0.0
    # A plain decode step's own line, when measured apart (a verify step also pays for tree
    # masks and verification); None: plain steps follow target_seconds too.
    plain_fixed_s: float | None = None
    plain_per_token_s: float | None = None

    def __post_init__(self) -> None:
        require(
            (self.plain_fixed_s is None) == (self.plain_per_token_s is None),
            "SpecCostView.plain_fixed_s",
            "set together with plain_per_token_s, or both None",
            (self.plain_fixed_s, self.plain_per_token_s),
        )
        plain = () if self.plain_fixed_s is None else ("plain_fixed_s", "plain_per_token_s")
        for name in (
            "target_fixed_s",
            "target_per_token_s",
            "draft_fixed_s",
            "draft_per_seq_s",
            "draft_setup_s",
            *plain,
        ):
            value = getattr(self, name)
            require(
                is_number(value) and value >= 0,
                f"SpecCostView.{name}",
                "a finite number >= 0",
                value,
            )
        require(
            self.target_fixed_s + self.target_per_token_s > 0,
            "SpecCostView.target_fixed_s",
            "a target step that costs time (target_fixed_s + target_per_token_s > 0)",
            self.target_fixed_s,
        )

    def target_seconds(self, num_tokens: int) -> float:
        return self.target_fixed_s + self.target_per_token_s * num_tokens

    def step_seconds(self, num_tokens: int, drafting: bool) -> float:
        """The target's part of a decode step: a verify step's line when anyone drafts, else
        the plain line (where measured)."""
        if drafting or self.plain_fixed_s is None or self.plain_per_token_s is None:
            return self.target_seconds(num_tokens)
        return self.plain_fixed_s + self.plain_per_token_s * num_tokens

    def draft_seconds(self, num_seqs: int) -> float:
        return self.draft_fixed_s + self.draft_per_seq_s * num_seqs if num_seqs else 0.0

    @classmethod
    def from_step_cost_model(
        cls,
        cost: StepCostModel,
        *,
        total_context_tokens: int,
        draft_fixed_s: float,
        draft_per_seq_s: float = 0.0,
    ) -> SpecCostView:
        """Target costs from a decode-step regression at the batch's current context: each extra
        query token costs what an extra sequence does (``decode_per_seq_s``)."""
        return cls(
            target_fixed_s=cost.decode_fixed_s
            + cost.decode_per_context_token_s * total_context_tokens,
            target_per_token_s=cost.decode_per_seq_s,
            draft_fixed_s=draft_fixed_s,
            draft_per_seq_s=draft_per_seq_s,
        )


@dataclass(frozen=True)
class SpeculationDecision:
    """Draft budgets for one step and what the policy predicted of them."""

    policy: str
    # request_id -> draft tokens (tree nodes); 0: plain decoding for that request.
    draft_tokens: dict[str, int]
    # Predicted tokens per second with these budgets, and with none (plain decoding); None when
    # the policy was given no costs (off, fixed).
    predicted_goodput: float | None = None
    plain_goodput: float | None = None

    @property
    def num_speculating(self) -> int:
        return sum(1 for k in self.draft_tokens.values() if k > 0)

    @property
    def total_draft_tokens(self) -> int:
        return sum(self.draft_tokens.values())

    @property
    def predicted_speedup(self) -> float | None:
        if self.predicted_goodput is None or not self.plain_goodput:
            return None
        return self.predicted_goodput / self.plain_goodput

    def metrics(self) -> dict[str, float]:
        """Flat numbers for per-step metrics (gauges / telemetry attributes)."""
        out = {
            "spec_batch_size": float(len(self.draft_tokens)),
            "spec_num_speculating": float(self.num_speculating),
            "spec_draft_tokens": float(self.total_draft_tokens),
            "spec_max_draft_tokens": float(max(self.draft_tokens.values(), default=0)),
        }
        if self.predicted_speedup is not None:
            out["spec_predicted_speedup"] = self.predicted_speedup
        return out


class SpeculationPolicy(Protocol):
    """Contract: ``decide`` returns a budget >= 0 for every request in ``requests`` (and no
    other), never more than a request's ``max_useful_draft_tokens``, and does not change its
    arguments. ``cost`` may be None for policies that do not use it (off, fixed)."""

    name: str

    def decide(
        self, requests: Sequence[SpecRequestView], cost: SpecCostView | None = None
    ) -> SpeculationDecision: ...


def _cap(budget: int, request: SpecRequestView) -> int:
    limit = request.max_useful_draft_tokens
    return budget if limit is None else min(budget, limit)


def _check_requests(requests: Sequence[SpecRequestView]) -> None:
    bad = [r for r in requests if not isinstance(r, SpecRequestView)]
    require(not bad, "requests", "SpecRequestView items", bad[:1])
    ids = [r.request_id for r in requests]
    require(len(set(ids)) == len(ids), "requests", "distinct request ids", ids)


# --- Policies ---------------------------------------------------------------------------------


class NoSpeculation:
    """Plain decoding for everyone."""

    name = "off"

    def decide(
        self, requests: Sequence[SpecRequestView], cost: SpecCostView | None = None
    ) -> SpeculationDecision:
        _check_requests(requests)
        return SpeculationDecision(self.name, {r.request_id: 0 for r in requests})


class FixedSpeculation:
    """The same budget for every request, whatever the batch (vLLM's and SGLang's default)."""

    name = "fixed"

    def __init__(self, num_draft_tokens: int = 4) -> None:
        require(
            is_count(num_draft_tokens, 0), "num_draft_tokens", "an integer >= 0", num_draft_tokens
        )
        self.num_draft_tokens = num_draft_tokens

    def decide(
        self, requests: Sequence[SpecRequestView], cost: SpecCostView | None = None
    ) -> SpeculationDecision:
        _check_requests(requests)
        return SpeculationDecision(
            self.name, {r.request_id: _cap(self.num_draft_tokens, r) for r in requests}
        )


class AdaptiveSpeculation:
    """Budgets that maximize predicted goodput (emitted tokens per second) of the whole step.

    goodput(k) = sum_i E_i[emitted | k_i] / (target_seconds(sum_i (1 + k_i)) + draft_setup_s
                                              + sum_{j=1..max k} draft_seconds(#{i: k_i >= j}))

    For each draft depth cap d = 0..max_draft_tokens, Dinkelbach's iteration finds the best
    budgets under the cap: at a goodput guess g, request i's budget maximizes
    E_i[emitted | k] - g * (target_per_token_s + draft_per_seq_s) * k, i.e. it takes draft
    token j while its marginal gain alpha_i**j beats that price; then g <- goodput(budgets),
    repeated until g stops rising. The best cap wins; cap 0 is plain decoding, so speculation
    is chosen only when it is predicted to beat it by ``min_relative_gain``.
    NOTE: the price per draft token grows with the measured cost of a token, so large batches on
    a compute-bound target get 0, small ones with good acceptance get deep drafts, and requests
    with poor acceptance get less than their neighbours in the same step.
    """

    name = "adaptive"

    def __init__(self, max_draft_tokens: int = 8, min_relative_gain: float = 0.05) -> None:
        require(
            is_count(max_draft_tokens, 1), "max_draft_tokens", "an integer >= 1", max_draft_tokens
        )
        require(
            is_number(min_relative_gain) and min_relative_gain >= 0,
            "min_relative_gain",
            "a finite number >= 0",
            min_relative_gain,
        )
        self.max_draft_tokens = max_draft_tokens
        self.min_relative_gain = float(min_relative_gain)

    def decide(
        self, requests: Sequence[SpecRequestView], cost: SpecCostView | None = None
    ) -> SpeculationDecision:
        _check_requests(requests)
        require(isinstance(cost, SpecCostView), "cost", "a SpecCostView", cost)
        assert cost is not None
        plain = {r.request_id: 0 for r in requests}
        if not requests:
            return SpeculationDecision(self.name, plain, 0.0, 0.0)
        # Per request: each draft's expected gain, and the most drafts that can be used.
        gains = [r.draft_gains(_cap(self.max_draft_tokens, r)) for r in requests]
        plain_goodput = _goodput(gains, [0] * len(requests), cost)
        best_budgets, best_goodput = [0] * len(requests), plain_goodput
        for cap in range(1, self.max_draft_tokens + 1):
            budgets, value = _best_under_cap(gains, cost, cap, plain_goodput)
            if value > best_goodput:
                best_budgets, best_goodput = budgets, value
        if best_goodput < plain_goodput * (1.0 + self.min_relative_gain):
            return SpeculationDecision(self.name, plain, plain_goodput, plain_goodput)
        return SpeculationDecision(
            self.name,
            {r.request_id: k for r, k in zip(requests, best_budgets, strict=True)},
            best_goodput,
            plain_goodput,
        )


def _best_under_cap(
    gains: list[list[float]], cost: SpecCostView, cap: int, start: float
) -> tuple[list[int], float]:
    price_per_token = cost.target_per_token_s + cost.draft_per_seq_s
    best, best_value = [0] * len(gains), start
    g = start
    for _ in range(50):
        threshold = g * price_per_token
        budgets = [_budget_at_price(request_gains[:cap], threshold) for request_gains in gains]
        value = _goodput(gains, budgets, cost)
        if value <= best_value * (1 + 1e-12):
            break
        best, best_value, g = budgets, value, value
    return best, best_value


def _budget_at_price(gains: list[float], threshold: float) -> int:
    """The most drafts whose last one's expected gain exceeds threshold (gains nonincreasing)."""
    budget = 0
    for k, gain in enumerate(gains, start=1):
        if gain <= threshold:
            break
        budget = k
    return budget


def _goodput(gains: list[list[float]], budgets: Sequence[int], cost: SpecCostView) -> float:
    emitted = sum(1.0 + sum(g[:k]) for g, k in zip(gains, budgets, strict=True))
    drafting = max(budgets, default=0) > 0
    seconds = cost.step_seconds(len(budgets) + sum(budgets), drafting)
    if drafting:
        seconds += cost.draft_setup_s
    for depth in range(1, max(budgets, default=0) + 1):
        seconds += cost.draft_seconds(sum(1 for k in budgets if k >= depth))
    return emitted / seconds


def goodput(
    requests: Sequence[SpecRequestView], budgets: Sequence[int], cost: SpecCostView
) -> float:
    """Predicted emitted tokens per second of one step with these budgets."""
    return _goodput(
        [r.draft_gains(k) for r, k in zip(requests, budgets, strict=True)], budgets, cost
    )


# --- Registry ---------------------------------------------------------------------------------

SPECULATION_POLICIES: dict[str, type[SpeculationPolicy]] = {
    "off": NoSpeculation,
    "fixed": FixedSpeculation,
    "adaptive": AdaptiveSpeculation,
}


def make_speculation_policy(name: str, **kwargs: Any) -> SpeculationPolicy:
    """A fresh policy by its config name; ``kwargs`` go to its constructor."""
    try:
        cls = SPECULATION_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"speculation_policy: expected one of {sorted(SPECULATION_POLICIES)}, got {name!r}"
        ) from None
    return cls(**kwargs)
