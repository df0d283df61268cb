"""Speculative decoding's configuration: the draft head, the tree budget and the policy."""

from __future__ import annotations

from dataclasses import dataclass

from raycake.policies.speculation import (
    SPECULATION_POLICIES,
    AdaptiveSpeculation,
    FixedSpeculation,
    NoSpeculation,
    SpeculationPolicy,
)
from raycake.validation import check_positive_int, require

SPECULATIVE_METHODS = ("eagle",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: an EAGLE draft head proposes a token tree the target verifies."""

    # "eagle": an EAGLE-1 head (raycake.model.eagle); None: speculation off.
    method: str | None = "eagle"
    # The head's folder (config.json + model.safetensors); "default": the embedded model's head.
    draft_model: str = ""
    # Draft tree node budget per request per step (the most draft tokens verified at once).
    num_draft_tokens: int = 8
    tree_top_k: int = 4  # children per expanded node, and nodes expanded per depth (EAGLE-2)
    max_depth: int = 4  # the deepest draft token (tokens accepted per step <= max_depth + 1)
    # Per-step draft budget: "fixed" (num_draft_tokens), "adaptive" (by load), "off".
    policy: str = "fixed"

    def __post_init__(self) -> None:
        if self.method is not None:
            require(
                self.method in SPECULATIVE_METHODS,
                "speculative.method",
                f"one of {list(SPECULATIVE_METHODS)} or null",
                self.method,
            )
            require(
                isinstance(self.draft_model, str) and self.draft_model != "",
                "speculative.draft_model",
                "the EAGLE head's folder",
                self.draft_model,
            )
        check_positive_int("speculative.num_draft_tokens", self.num_draft_tokens)
        check_positive_int("speculative.tree_top_k", self.tree_top_k)
        check_positive_int("speculative.max_depth", self.max_depth)
        require(
            self.policy in SPECULATION_POLICIES,
            "speculative.policy",
            f"one of {list(SPECULATION_POLICIES)}",
            self.policy,
        )


def speculation_policy_from_config(config: SpeculativeConfig) -> SpeculationPolicy:
    """``config.policy`` with ``num_draft_tokens`` as the fixed budget, or (up to ``max_depth``)
    as the adaptive maximum."""
    if config.method is None or config.policy == "off":
        return NoSpeculation()
    if config.policy == "fixed":
        return FixedSpeculation(config.num_draft_tokens)
    # The goodput model values depth, not width: nodes beyond the tree's depth widen it, which
    # the model would count as cost only, so adaptive budgets stop at the depth.
    return AdaptiveSpeculation(max_draft_tokens=min(config.num_draft_tokens, config.max_depth))
