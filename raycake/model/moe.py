"""A mixture-of-experts feed-forward layer: a router picks experts, SwiGLU experts run grouped.

Legend: T tokens (flattened over the batch), H hidden size, I expert intermediate size,
E experts, k experts per token, N kept (token, choice) pairs.

Parameter names and layouts follow transformers 5's ``MixtralSparseMoeBlock`` (``gate.weight``,
``experts.gate_up_proj`` [E, 2I, H] = gate|up, ``experts.down_proj`` [E, H, I]), so a Mixtral
layer's state dict loads as is. Which experts a token gets is a policy
(``raycake.policies.routing``); this module owns only the weights and the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raycake.policies.routing import Router, RoutingResult


class FusedExperts(nn.Module):
    """E SwiGLU MLPs stored as two 3-D tensors; the unit an expert shard would hold a slice of."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; expert_indices, gates, kept [T, k]. Returns sum_j gate_j * expert_j(x) [T, H].

        Tokens are sorted by expert so each expert with work runs one matmul pair over all of
        its tokens; experts without tokens cost nothing. Dropped pairs are never computed, so
        a token with every choice dropped comes out as exact zeros (the residual carries it).
        """
        plan = plan_dispatch(expert_indices, kept, self.num_experts)
        out = self.run_grouped(x[plan.tokens], plan.counts)  # [N, H]
        return combine(x, plan, gates, out)

    def run_grouped(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """grouped [N, H]: tokens sorted by expert, ``counts[e]`` of them for expert e.
        Returns each token's unweighted expert output [N, H] in the same order."""
        out = torch.empty_like(grouped)  # [N, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            h = F.linear(grouped[start:end], self.gate_up_proj[expert])  # [n, 2I]
            gate, up = h.split(self.intermediate_size, dim=-1)  # [n, I] each
            out[start:end] = F.linear(F.silu(gate) * up, self.down_proj[expert])  # [n, H]
            start = end
        return out


@dataclass(frozen=True)
class DispatchPlan:
    """Kept (token, choice) pairs grouped by expert: the layout experts run on."""

    slots: torch.Tensor  # [N] flat index token * k + choice, grouped by expert
    tokens: torch.Tensor  # [N] the token of each pair
    counts: list[int]  # [E] pairs per expert, on the host (it drives the expert loop)


def plan_dispatch(
    expert_indices: torch.Tensor, kept: torch.Tensor, num_experts: int
) -> DispatchPlan:
    """Group the kept pairs by expert, tokens staying in position order within each expert."""
    top_k = expert_indices.shape[1]
    slots = kept.flatten().nonzero().squeeze(1)  # [N] kept pairs, as token * k + choice
    slot_expert = expert_indices.flatten()[slots]  # [N]
    order = slot_expert.argsort(stable=True)  # stable: tokens stay in position order
    slots, slot_expert = slots[order], slot_expert[order]  # [N], grouped by expert
    # NOTE: the one host sync of the layer: the split sizes drive the Python loop.
    counts = torch.bincount(slot_expert, minlength=num_experts).tolist()  # [E]
    return DispatchPlan(slots=slots, tokens=slots // top_k, counts=counts)


def combine(
    x: torch.Tensor, plan: DispatchPlan, gates: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Sum each token's expert outputs [N, H] weighted by its gates [T, k] -> [T, H]."""
    # Weight in float32 (the gates' precision) and cast back, as transformers does.
    weights = gates.flatten()[plan.slots].unsqueeze(1)  # [N, 1]
    out = (out.float() * weights).to(x.dtype)  # [N, H]
    return torch.zeros_like(x).index_add_(0, plan.tokens, out)  # [T, H]


class MoEFeedForward(nn.Module):
    """Router linear + routing policy + fused experts: a drop-in for the dense MLP.

    ``gate`` is the router's linear layer (transformers' name); ``router`` is the policy,
    not a module, so it has no parameters and is not in the state dict.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, router: Router
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = router
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingResult]:
        """x [..., H] (leading dims are flattened into one routing group); token_ids [...]."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [T, H]
        if token_ids is not None:
            token_ids = token_ids.reshape(-1)  # [T]
        # Router logits in float32 ("selective precision"): E columns, cheap even at fp32.
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        routing = self.router.route(logits, token_ids)
        out = self.experts(x, routing.expert_indices, routing.gates, routing.kept)  # [T, H]
        return out.view(*lead, out.shape[-1]), routing


@dataclass
class MoEStats:
    """Running expert load over many steps. ``update`` syncs the device: call it per step, not per layer
    in a hot loop, or only when telemetry is on."""

    num_experts: int
    tokens_per_expert: list[int] = field(default_factory=list)  # kept pairs per expert
    # (token, choice) pairs the router sent to each expert, kept or dropped: its demand.
    assigned_per_expert: list[int] = field(default_factory=list)
    num_assignments: int = 0  # (token, choice) pairs asked for, kept or not
    num_dropped: int = 0

    def __post_init__(self) -> None:
        if not self.tokens_per_expert:
            self.tokens_per_expert = [0] * self.num_experts
        if not self.assigned_per_expert:
            self.assigned_per_expert = [0] * self.num_experts

    def update(self, routing: RoutingResult) -> None:
        if routing.num_experts != self.num_experts:
            raise ValueError(f"stats over {self.num_experts} experts got {routing.num_experts}")
        kept = routing.tokens_per_expert.tolist()
        assigned = torch.bincount(
            routing.expert_indices.flatten(), minlength=self.num_experts
        ).tolist()
        for expert in range(self.num_experts):
            self.tokens_per_expert[expert] += kept[expert]
            self.assigned_per_expert[expert] += assigned[expert]
        self.num_assignments += routing.expert_indices.numel()
        self.num_dropped += int(routing.num_dropped)

    @property
    def drop_rate(self) -> float:
        return self.num_dropped / self.num_assignments if self.num_assignments else 0.0

    @property
    def imbalance(self) -> float:
        """Busiest expert's demand over the mean: 1.0 is perfect balance, E the worst.

        Measured on the router's choices before capacity drops: with a capacity the kept load
        is capped, so it would look balanced exactly when most tokens are being dropped.
        """
        return _max_over_mean(self.assigned_per_expert)

    @property
    def kept_imbalance(self) -> float:
        """The same ratio over the tokens the experts actually ran (after drops)."""
        return _max_over_mean(self.tokens_per_expert)


def _max_over_mean(loads: list[int]) -> float:
    total = sum(loads)
    if total == 0:
        return 1.0
    return max(loads) / (total / len(loads))
