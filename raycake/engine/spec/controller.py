"""The stateful side of speculation: what was accepted, what steps cost, and the per-step hook.

``SpeculationController.budget_for`` has the scheduler's ``DraftBudget`` signature (request ids
-> draft tokens): it builds each request's view from an ``AcceptanceTracker``, the step costs
from measured timings (``LinearTimingFit``; a prior until measured), asks the policy and keeps
the decision for metrics (``last_decision``, ``metrics()``). The runner reports back with
``observe_verify`` / ``observe_target_step`` / ``observe_drafting`` and ``forget``.
Pure Python: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raycake.engine.spec.config import SpeculativeConfig, speculation_policy_from_config
from raycake.policies.speculation import (
    SpecCostView,
    SpecRequestView,
    SpeculationDecision,
    SpeculationPolicy,
)
from raycake.validation import is_count, is_number, require

# --- Acceptance ---------------------------------------------------------------------------------


@dataclass
class _Acceptance:
    """Decayed counts of one request's accepted and rejected draft tokens."""

    accepted: float
    rejected: float
    mean_emitted: float | None = None
    # Per depth j (entry j - 1): [accepted, reached] decayed counts, where a draft at depth j
    # is reached when every draft before it was accepted.
    depths: list[list[float]] = field(default_factory=list)


def _count_depths(depths: list[list[float]], drafted: int, accepted: int, decay: float) -> None:
    """Decay ``depths`` and add one verify step's outcome at each depth it reached."""
    for counts in depths:
        counts[0] *= decay
        counts[1] *= decay
    reached = min(accepted + 1, drafted)
    while len(depths) < reached:
        depths.append([0.0, 0.0])
    for j in range(reached):
        depths[j][0] += j < accepted
        depths[j][1] += 1.0


class AcceptanceTracker:
    """Per-request acceptance rate: exponentially weighted counts of accepted and rejected drafts.

    The geometric model's maximum-likelihood rate is accepted / (accepted + rejections), where a
    step that drafted k and accepted a < k counts a acceptances and one rejection (a == k counts
    no rejection: the chain was never refuted). Both counts decay by ``decay`` per observed step,
    and start from a prior worth ``prior_weight`` draft tokens, so a new request gets a modest
    budget and its own history takes over within a few steps. The prior's rate is
    ``prior_rate`` until anything is observed; with ``learn_prior`` it is then the rate over all
    requests (counts decayed by ``prior_decay`` per step), since a head that is good for the
    requests so far is likely good for the next one.

    With ``learn_prior`` the tracker also keeps acceptance per depth (``depth_acceptance``):
    the rate at which a draft at depth j is accepted once the drafts before it were. On text
    the first draft is the hardest (runs of easy tokens follow each other), so the geometric
    model fitted on shallow drafts would undervalue deep ones. Each request's per-depth rates
    start from all requests' (worth ``prior_weight`` steps) and follow its own outcomes.
    """

    def __init__(
        self,
        prior_rate: float = 0.6,
        prior_weight: float = 4.0,
        decay: float = 0.8,
        *,
        learn_prior: bool = True,
        prior_decay: float = 0.98,
    ) -> None:
        require(
            is_number(prior_rate) and 0.0 <= prior_rate <= 1.0,
            "prior_rate",
            "a number in [0, 1]",
            prior_rate,
        )
        require(is_number(prior_weight) and prior_weight > 0, "prior_weight", "> 0", prior_weight)
        require(is_number(decay) and 0.0 < decay <= 1.0, "decay", "a number in (0, 1]", decay)
        require(
            is_number(prior_decay) and 0.0 < prior_decay <= 1.0,
            "prior_decay",
            "a number in (0, 1]",
            prior_decay,
        )
        self.prior_rate, self.prior_weight, self.decay = prior_rate, prior_weight, decay
        self.learn_prior, self.prior_decay = learn_prior, prior_decay
        self._state: dict[str, _Acceptance] = {}
        self._all = _Acceptance(
            accepted=prior_rate * prior_weight, rejected=(1 - prior_rate) * prior_weight
        )
        self._all_depths: list[list[float]] = []

    @property
    def current_prior_rate(self) -> float:
        """The rate a request with no history starts from."""
        if not self.learn_prior:
            return self.prior_rate
        return self._all.accepted / (self._all.accepted + self._all.rejected)

    def observe(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        """One verify step: ``num_accepted`` of ``num_draft_tokens`` drafts were accepted."""
        require(
            is_count(num_draft_tokens, 0), "num_draft_tokens", "an integer >= 0", num_draft_tokens
        )
        require(
            is_count(num_accepted, 0) and num_accepted <= num_draft_tokens,
            "num_accepted",
            f"an integer in [0, num_draft_tokens={num_draft_tokens}]",
            num_accepted,
        )
        if num_draft_tokens == 0:
            return
        state = self._state.get(request_id)
        if state is None:
            rate = self.current_prior_rate
            state = self._state[request_id] = _Acceptance(
                accepted=rate * self.prior_weight, rejected=(1 - rate) * self.prior_weight
            )
        rejected = float(num_accepted < num_draft_tokens)
        _count_depths(state.depths, num_draft_tokens, num_accepted, self.decay)
        _count_depths(self._all_depths, num_draft_tokens, num_accepted, self.prior_decay)
        state.accepted = self.decay * state.accepted + num_accepted
        state.rejected = self.decay * state.rejected + rejected
        self._all.accepted = self.prior_decay * self._all.accepted + num_accepted
        self._all.rejected = self.prior_decay * self._all.rejected + rejected
        emitted = num_accepted + 1
        state.mean_emitted = (
            emitted
            if state.mean_emitted is None
            else self.decay * state.mean_emitted + (1 - self.decay) * emitted
        )

    def acceptance_rate(self, request_id: str) -> float:
        """The request's fitted rate; the prior for a request with no observed step."""
        state = self._state.get(request_id)
        if state is None or state.accepted + state.rejected == 0:
            return self.current_prior_rate
        return state.accepted / (state.accepted + state.rejected)

    def mean_emitted_tokens(self, request_id: str) -> float | None:
        """EWMA of tokens emitted per verify step (1 + accepted); None before any step."""
        state = self._state.get(request_id)
        return None if state is None else state.mean_emitted

    def depth_acceptance(self, request_id: str) -> tuple[float, ...]:
        """The request's acceptance rate at each depth seen so far (any request's); () without
        ``learn_prior`` or before any observation."""
        if not self.learn_prior:
            return ()
        state = self._state.get(request_id)
        own = state.depths if state is not None else []
        rates = []
        for j, (accepted, reached) in enumerate(self._all_depths):
            # All requests' rate, itself starting from the prior rate (one step's worth).
            shared = (accepted + self.prior_rate) / (reached + 1.0)
            mine_accepted, mine_reached = own[j] if j < len(own) else (0.0, 0.0)
            weight = self.prior_weight
            rates.append((mine_accepted + weight * shared) / (mine_reached + weight))
        return tuple(rates)

    def view(self, request_id: str, tokens_left: int | None = None) -> SpecRequestView:
        return SpecRequestView(
            request_id,
            self.acceptance_rate(request_id),
            tokens_left,
            self.depth_acceptance(request_id),
        )

    def relax(self, request_id: str) -> None:
        """A step in which the request did not draft: its own evidence decays as if a step had
        passed, so its rates drift back to all requests' and a few unlucky early steps cannot
        shut it out of drafting for good."""
        state = self._state.get(request_id)
        if state is None:
            return
        state.accepted *= self.decay
        state.rejected *= self.decay
        for counts in state.depths:
            counts[0] *= self.decay
            counts[1] *= self.decay

    def forget(self, request_id: str) -> None:
        """Drop a finished or aborted request."""
        self._state.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._state)


# --- Step costs ---------------------------------------------------------------------------------


class LinearTimingFit:
    """seconds ~ fixed + slope x size, by exponentially weighted least squares (both >= 0).

    Each observation's weight decays by ``decay`` per later observation, so the fit follows a
    changing machine. ``fit()`` is None until two distinct sizes were seen (the slope is then
    undetermined); a fit with a single size is still useful as ``mean_seconds``.
    """

    def __init__(self, decay: float = 0.98) -> None:
        require(is_number(decay) and 0.0 < decay <= 1.0, "decay", "a number in (0, 1]", decay)
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, size: float, seconds: float) -> None:
        require(is_number(size) and size >= 0, "size", "a finite number >= 0", size)
        require(is_number(seconds) and seconds > 0, "seconds", "a finite number > 0", seconds)
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + size
        self._y = d * self._y + seconds
        self._xx = d * self._xx + size * size
        self._xy = d * self._xy + size * seconds

    @property
    def weight(self) -> float:
        """The observations' total (decayed) weight."""
        return self._w

    @property
    def mean_seconds(self) -> float | None:
        return None if self._w == 0 else self._y / self._w

    @property
    def mean_size(self) -> float | None:
        return None if self._w == 0 else self._x / self._w

    def fit(self) -> tuple[float, float] | None:
        """(fixed, slope), or None while the sizes seen do not determine a slope."""
        if self._w == 0:
            return None
        variance = self._w * self._xx - self._x * self._x
        if variance <= 1e-9 * max(1.0, self._w * self._xx):
            return None
        slope = max(0.0, (self._w * self._xy - self._x * self._y) / variance)
        fixed = (self._y - slope * self._x) / self._w
        if fixed < 0:  # the best fit through the origin instead
            return 0.0, self._xy / self._xx
        return fixed, slope


def _line(
    timing: LinearTimingFit, fitted: tuple[float, float] | None, slope: float
) -> tuple[float, float] | None:
    """(fixed, per token): the fit, or ``slope`` through the measured mean; None if unmeasured."""
    if fitted is not None:
        return fitted
    mean_s, mean_size = timing.mean_seconds, timing.mean_size
    if mean_s is None or mean_size is None:
        return None
    return max(0.0, mean_s - slope * mean_size), slope


# --- The scheduler's hook ---------------------------------------------------------------------

# Drafting steps measured before the measured draft cost is trusted alone (see ``cost``).
MIN_DRAFT_OBSERVATIONS = 4.0
# Until measured: a target step that is mostly fixed cost and a draft step a tenth of it.
DEFAULT_PRIOR_COST = SpecCostView(
    target_fixed_s=0.010, target_per_token_s=1e-5, draft_fixed_s=0.001, draft_per_seq_s=0.0
)


class SpeculationController:
    """A policy with the state it decides on. Not thread-safe: one per engine.

    ``explore_every``: after that many steps in a row in which the policy drafted for nobody,
    one request (in turn) gets a probe budget of ``probe_tokens`` for a step, so acceptance and
    draft costs measured long ago (or under other load) cannot keep speculation off for good.
    A probe costs one request's drafts once per ``explore_every`` steps. Likewise after that
    many steps with drafts (or 8 while the target's cost per token is undetermined) one step
    runs plain. None: never probe (the fixed and off policies decide without measurements).

    ``reuse_quiet_decisions``: a decision that drafted for nobody is reused for up to that many
    steps while no new request joins the batch.
    """

    def __init__(
        self,
        policy: SpeculationPolicy,
        tracker: AcceptanceTracker | None = None,
        prior_cost: SpecCostView = DEFAULT_PRIOR_COST,
        *,
        explore_every: int | None = None,
        probe_tokens: int = 1,
        reuse_quiet_decisions: int = 0,
    ) -> None:
        if explore_every is not None:
            require(is_count(explore_every, 1), "explore_every", "an integer >= 1", explore_every)
        require(is_count(probe_tokens, 1), "probe_tokens", "an integer >= 1", probe_tokens)
        self.policy = policy
        self.tracker = tracker or AcceptanceTracker()
        self.prior_cost = prior_cost
        require(
            is_count(reuse_quiet_decisions, 0),
            "reuse_quiet_decisions",
            "an integer >= 0",
            reuse_quiet_decisions,
        )
        self.explore_every, self.probe_tokens = explore_every, probe_tokens
        self.reuse_quiet_decisions = reuse_quiet_decisions
        self._reuse_left = 0
        self._cost: SpecCostView | None = None  # cost() until the next timing observation
        self.target_timing = LinearTimingFit()  # seconds by query tokens of a verify step
        self.plain_timing = LinearTimingFit()  # the same for plain decode steps
        self.draft_timing = LinearTimingFit()  # seconds of a step's drafting by tree depth
        self.last_decision: SpeculationDecision | None = None
        self.num_steps = 0
        # Steps in which at least one request speculated (probes included), and probes.
        self.num_speculating_steps = 0
        self.num_probe_steps = 0
        self.num_plain_probe_steps = 0
        self._quiet_steps = 0  # steps in a row without drafts
        self._busy_steps = 0  # steps in a row with drafts

    @classmethod
    def from_config(cls, config: SpeculativeConfig) -> SpeculationController:
        policy = speculation_policy_from_config(config)
        if policy.name != "adaptive":
            return cls(policy)
        # A probe's cost is mostly the head catching up on the request's whole sequence (a
        # head prefill), so a short draft teaches as much as a deep one, and probes are rare.
        return cls(
            policy,
            explore_every=256,
            probe_tokens=min(2, config.num_draft_tokens),
            reuse_quiet_decisions=8,
        )

    def cost(self) -> SpecCostView:
        """The current ``SpecCostView`` (refitted only after a new observation: the scheduler
        and the runner both ask every step)."""
        if self._cost is None:
            self._cost = self._fit_cost()
        return self._cost

    def _fit_cost(self) -> SpecCostView:
        """Measured costs where measured, the prior's elsewhere.

        Plain decode steps and verify steps are fitted apart: a verify step also pays for
        tree masks, verification and KV moves, which a single line through both would read as
        a steep cost per token. A line seen at a single size takes its slope from the other
        line when that one is determined (a token costs the same compute in both), else from
        the prior, through the measured mean.
        """
        prior = self.prior_cost
        plain_fit, verify_fit = self.plain_timing.fit(), self.target_timing.fit()
        slope = (plain_fit or verify_fit or (0.0, prior.target_per_token_s))[1]
        plain = _line(self.plain_timing, plain_fit, slope)
        target = _line(self.target_timing, verify_fit, slope) or plain
        if target is None or target[0] + target[1] <= 0:
            target = (prior.target_fixed_s, prior.target_per_token_s)
        # Drafting d deep: a setup (the head catching up, the root's logits) plus d - 1
        # expansions, fitted as setup + per_depth x d over the depths seen.
        draft = self.draft_timing.fit()
        if draft is None:
            draft = (prior.draft_setup_s, prior.draft_fixed_s)
            mean_s, mean_depth = self.draft_timing.mean_seconds, self.draft_timing.mean_size
            if mean_s is not None and mean_depth:
                draft = (0.0, mean_s / mean_depth)
        # The first drafting steps run new shapes and cold caches: until a few are measured,
        # the prior keeps a share, so one slow step cannot switch speculation off for good.
        trust = min(1.0, self.draft_timing.weight / MIN_DRAFT_OBSERVATIONS)
        draft = (
            trust * draft[0] + (1 - trust) * prior.draft_setup_s,
            trust * draft[1] + (1 - trust) * prior.draft_fixed_s,
        )
        return SpecCostView(
            target_fixed_s=target[0],
            target_per_token_s=target[1],
            plain_fixed_s=None if plain is None else plain[0],
            plain_per_token_s=None if plain is None else plain[1],
            draft_fixed_s=draft[1],
            draft_per_seq_s=0.0,
            draft_setup_s=draft[0],
        )

    def budget_for(self, request_ids: list[str]) -> dict[str, int]:
        """The scheduler's ``DraftBudget``: draft tokens for each decoding request this step."""
        last = self.last_decision
        if (
            last is not None
            and last.num_speculating == 0
            and self._reuse_left > 0
            and all(rid in last.draft_tokens for rid in request_ids)
        ):
            # Nothing drafted, so nothing new was learned about acceptance: the same batch
            # (or part of it) gets the same answer for a few steps, which keeps the policy's
            # cost off large batches that do not speculate.
            self._reuse_left -= 1
            decision = SpeculationDecision(
                last.policy,
                dict.fromkeys(request_ids, 0),
                last.predicted_goodput,
                last.plain_goodput,
            )
        else:
            views = [self.tracker.view(rid) for rid in request_ids]
            decision = self.policy.decide(views, self.cost())
            self._reuse_left = self.reuse_quiet_decisions
        self.last_decision = decision
        self.num_steps += 1
        budgets = dict(decision.draft_tokens)
        if decision.num_speculating == 0 and request_ids:
            self._busy_steps = 0
            self._quiet_steps += 1
            # While the draft cost rests on a few measurements, probe sooner.
            every = self.explore_every
            if every is not None and self.draft_timing.weight < MIN_DRAFT_OBSERVATIONS:
                every = min(every, 16)
            if every is not None and self._quiet_steps >= every:
                probe = request_ids[self.num_probe_steps % len(request_ids)]
                budgets[probe] = self.probe_tokens
                self.num_probe_steps += 1
                self._quiet_steps = 0
        elif request_ids:
            self._quiet_steps = 0
            self._busy_steps += 1
            # The mirror image: a plain step now and then, so the target's cost per token is
            # measured at two step sizes (drafting every step, all steps are one size).
            undetermined = self.plain_timing.weight == 0 and self._busy_steps >= 8
            if self.explore_every is not None and (
                undetermined or self._busy_steps >= self.explore_every
            ):
                budgets = dict.fromkeys(budgets, 0)
                self.num_plain_probe_steps += 1
                self._busy_steps = 0
        for rid, k in budgets.items():
            if k == 0:
                self.tracker.relax(rid)
        self.num_speculating_steps += any(k > 0 for k in budgets.values())
        return budgets

    def observe_verify(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        self.tracker.observe(request_id, num_draft_tokens, num_accepted)

    def observe_target_step(
        self, num_tokens: int, seconds: float, *, drafting: bool = True
    ) -> None:
        """A decode step's target forward over ``num_tokens`` query tokens (decodes + drafts)
        took ``seconds``; ``drafting``: it verified drafts (else a plain decode step)."""
        (self.target_timing if drafting else self.plain_timing).observe(num_tokens, seconds)
        self._cost = None

    def observe_drafting(self, depth: int, num_seqs: int, seconds: float) -> None:
        """Drafting trees ``depth`` deep for ``num_seqs`` requests took ``seconds`` in all.

        NOTE: the fit is over depth only and decays, so it follows the batch sizes of recent
        steps rather than modelling the number of requests.
        """
        require(is_count(depth, 1), "depth", "an integer >= 1", depth)
        require(is_count(num_seqs, 1), "num_seqs", "an integer >= 1", num_seqs)
        self.draft_timing.observe(depth, seconds)
        self._cost = None

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)

    def metrics(self) -> dict[str, float]:
        """The last step's choice (``SpeculationDecision.metrics``) plus running totals."""
        out = {} if self.last_decision is None else self.last_decision.metrics()
        out["spec_policy_steps"] = float(self.num_steps)
        out["spec_policy_speculating_steps"] = float(self.num_speculating_steps)
        out["spec_policy_probe_steps"] = float(self.num_probe_steps)
        out["spec_policy_plain_probe_steps"] = float(self.num_plain_probe_steps)
        return out
