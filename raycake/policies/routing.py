"""Which expert(s) each token goes to: the mixture-of-experts routing policy.

NOTE: this is the one policy module that imports torch. Every other policy decides over a
handful of requests or blocks per step, so plain Python is fast enough and keeps them testable
without torch. Routing decides per token per MoE layer, from a [T, E] tensor of router logits
that is already on the accelerator; a Python loop over tokens would cost more than the experts.
The rule still holds in spirit: a router is pure logic over its inputs (logits, token ids), owns
no parameters and holds no state, so it is tested with hand-built logits in milliseconds. The
router's linear layer belongs to the model (``raycake.model.moe``).

Legend: T tokens (flattened over the batch), E experts, k experts per token.

Routers are chosen by name (``moe.router``) and return one ``RoutingResult``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingResult:
    """Where each token goes and the router's training losses.

    NOTE: every field is a tensor on the logits' device, so routing never waits on the host;
    reading ``num_dropped`` or ``tokens_per_expert`` as Python numbers syncs the device.
    """

    expert_indices: torch.Tensor  # [T, k] long: the expert each (token, choice) asked for
    gates: torch.Tensor  # [T, k] float32: combine weight; NOTE: exactly 0 where not kept
    kept: torch.Tensor  # [T, k] bool: False where the expert was full and the choice dropped
    tokens_per_expert: torch.Tensor  # [E] long: kept (token, choice) pairs per expert
    num_dropped: torch.Tensor  # [] long: dropped (token, choice) pairs
    aux_loss: torch.Tensor  # [] float32: Switch load-balancing loss E * sum_i f_i * P_i
    z_loss: torch.Tensor  # [] float32: ST-MoE router z-loss mean_t logsumexp(logits_t)^2

    @property
    def num_tokens(self) -> int:
        return self.expert_indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]


@runtime_checkable
class Router(Protocol):
    """Turns router logits into a ``RoutingResult``.

    Contract: ``route`` reads ``logits`` [T, E] (any float dtype; routers compute in float32)
    and, for routers with ``needs_token_ids``, ``token_ids`` [T]. It returns exactly ``top_k``
    choices per token, is deterministic (no jitter noise: this is inference) and keeps no
    state between calls. A token whose choices are all dropped contributes nothing to the
    layer's output; the residual connection carries it.
    """

    name: ClassVar[str]
    top_k: int
    needs_token_ids: ClassVar[bool]

    def route(
        self, logits: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> RoutingResult: ...


def load_balancing_loss(probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4: E * sum_i f_i * P_i, over the choices the tokens asked for.

    f_i is the fraction of tokens whose top-k includes expert i (before any capacity drop, as
    in Mesh TensorFlow and transformers), P_i the mean router probability of expert i. For
    k > 1 this is Mixtral's version: f sums to k, so a perfectly balanced router scores k.
    """
    num_tokens, num_experts = probs.shape  # [T, E]
    if num_tokens == 0:  # an empty step: no load, no loss (not NaN)
        return probs.new_zeros((), dtype=torch.float32)
    counts = torch.bincount(expert_indices.flatten(), minlength=num_experts)  # [E]
    fraction = counts.float() / num_tokens  # [E]
    mean_prob = probs.float().mean(dim=0)  # [E]
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2, in float32."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def capacity_mask(expert_indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which (token, choice) pairs fit: each expert takes at most ``capacity``, first come first served.

    Order of arrival: every token's first choice in position order, then every second choice,
    and so on (GShard's priority), so a token's top choice is never displaced by another
    token's second choice. For k = 1 this is transformers' Switch router: position order.
    """
    num_tokens, top_k = expert_indices.shape  # [T, k]
    arrivals = expert_indices.t().reshape(-1)  # [k*T] choice-major, then position
    one_hot = F.one_hot(arrivals, num_experts)  # [k*T, E]
    # 1-based place in its expert's queue.
    place = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # [k*T]
    return (place <= capacity).view(top_k, num_tokens).t()  # [T, k]


def _result(
    logits: torch.Tensor,
    probs: torch.Tensor,
    expert_indices: torch.Tensor,
    gates: torch.Tensor,
    kept: torch.Tensor,
) -> RoutingResult:
    num_experts = logits.shape[-1]
    return RoutingResult(
        expert_indices=expert_indices,
        gates=torch.where(kept, gates, torch.zeros_like(gates)),
        kept=kept,
        tokens_per_expert=torch.bincount(expert_indices[kept], minlength=num_experts),
        num_dropped=(~kept).sum(),
        aux_loss=load_balancing_loss(probs, expert_indices),
        z_loss=router_z_loss(logits),
    )


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [tokens, experts], got {tuple(logits.shape)}")


@dataclass(frozen=True)
class SwitchTop1Router:
    """Switch Transformer: softmax in float32 ("selective precision"), one expert per token.

    Capacity per expert is ``expert_capacity`` if given, else ceil(T / E * capacity_factor),
    counted over the tokens of one ``route`` call. Overflow tokens are dropped in position
    order (first come first served) and pass through the residual only. Dropless when
    ``drop_tokens`` is False or no capacity is set (``capacity_factor=None``).

    NOTE: with drops, a token's output depends on the other tokens in the call. transformers
    routes each sequence separately (``expert_capacity`` per sequence); a serving step that
    flattens many requests into one call would let one request's tokens evict another's.
    """

    capacity_factor: float | None = 1.0
    drop_tokens: bool = True
    expert_capacity: int | None = None  # overrides capacity_factor: a fixed count per call

    name: ClassVar[str] = "switch"
    needs_token_ids: ClassVar[bool] = False
    top_k: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor: must be > 0, got {self.capacity_factor}")
        if self.expert_capacity is not None and self.expert_capacity < 1:
            raise ValueError(f"moe.expert_capacity: must be >= 1, got {self.expert_capacity}")

    @property
    def is_dropless(self) -> bool:
        return not self.drop_tokens or (
            self.capacity_factor is None and self.expert_capacity is None
        )

    def capacity(self, num_tokens: int, num_experts: int) -> int | None:
        """Tokens each expert takes in a call of ``num_tokens``; None when dropless."""
        if self.is_dropless:
            return None
        if self.expert_capacity is not None:
            return self.expert_capacity
        assert self.capacity_factor is not None
        return math.ceil(num_tokens / num_experts * self.capacity_factor)

    def route(self, logits: torch.Tensor, token_ids: torch.Tensor | None = None) -> RoutingResult:
        _check_logits(logits)
        num_tokens, num_experts = logits.shape  # [T, E]
        probs = logits.float().softmax(dim=-1)  # [T, E]
        gates, expert_indices = probs.max(dim=-1, keepdim=True)  # [T, 1], [T, 1]
        capacity = self.capacity(num_tokens, num_experts)
        if capacity is None:
            kept = torch.ones_like(expert_indices, dtype=torch.bool)  # [T, 1]
        else:
            kept = capacity_mask(expert_indices, num_experts, capacity)  # [T, 1]
        return _result(logits, probs, expert_indices, gates, kept)


@dataclass(frozen=True)
class TopKRouter:
    """Mixtral: the k most probable experts, dropless, gates = softmax renormalised over the k."""

    top_k: int = 2
    renormalize: bool = True

    name: ClassVar[str] = "topk"
    needs_token_ids: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"moe.top_k: must be >= 1, got {self.top_k}")

    def route(self, logits: torch.Tensor, token_ids: torch.Tensor | None = None) -> RoutingResult:
        _check_logits(logits)
        if self.top_k > logits.shape[-1]:
            raise ValueError(f"moe.top_k: {self.top_k} exceeds {logits.shape[-1]} experts")
        probs = logits.float().softmax(dim=-1)  # [T, E]
        gates, expert_indices = probs.topk(self.top_k, dim=-1)  # [T, k], [T, k]
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        kept = torch.ones_like(expert_indices, dtype=torch.bool)  # [T, k]
        return _result(logits, probs, expert_indices, gates, kept)


# Knuth's multiplicative hash: consecutive token ids land on unrelated experts.
_HASH_MULTIPLIER = 2654435761


@dataclass(frozen=True)
class HashRouter:
    """Hash Layers baseline: a fixed function of the token id picks one expert, gate 1.

    Ignores the logits for the choice (they only feed the reported losses), so routing is
    the same for a token id in every context, every batch and every run.
    """

    num_experts: int

    name: ClassVar[str] = "hash"
    needs_token_ids: ClassVar[bool] = True
    top_k: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts: must be >= 1, got {self.num_experts}")

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        # NOTE: token ids < 2**31 keep the product inside int64.
        hashed = (token_ids.long() * _HASH_MULTIPLIER) & 0xFFFFFFFF
        return hashed % self.num_experts

    def route(self, logits: torch.Tensor, token_ids: torch.Tensor | None = None) -> RoutingResult:
        _check_logits(logits)
        if token_ids is None:
            raise ValueError("the hash router needs token ids")
        if logits.shape != (token_ids.shape[0], self.num_experts):
            raise ValueError(
                f"hash router over {self.num_experts} experts got logits {tuple(logits.shape)} "
                f"for {token_ids.shape[0]} tokens"
            )
        expert_indices = self.expert_of(token_ids).view(-1, 1).to(logits.device)  # [T, 1]
        gates = torch.ones(expert_indices.shape, dtype=torch.float32, device=logits.device)
        kept = torch.ones_like(expert_indices, dtype=torch.bool)  # [T, 1]
        probs = logits.float().softmax(dim=-1)  # [T, E]
        return _result(logits, probs, expert_indices, gates, kept)


ROUTERS: dict[str, type[Router]] = {
    SwitchTop1Router.name: SwitchTop1Router,
    TopKRouter.name: TopKRouter,
    HashRouter.name: HashRouter,
}


def make_router(name: str, **kwargs: Any) -> Router:
    """A router by its config name; ``kwargs`` go to its constructor."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"moe.router: expected one of {sorted(ROUTERS)}, got {name!r}") from None
    return cls(**kwargs)
