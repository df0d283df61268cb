"""SpeculativeConfig: validated fields, and the policy object it names."""

from __future__ import annotations

import pytest

from raycake.engine.spec.config import SpeculativeConfig, speculation_policy_from_config
from raycake.policies.speculation import AdaptiveSpeculation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "greedy"}, "speculative.policy"),
        ({"method": "medusa"}, "speculative.method"),
        ({"draft_model": ""}, "speculative.draft_model"),
        ({"max_depth": 0}, "speculative.max_depth"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig(**{"draft_model": "head", **kwargs})


def test_policy_from_config():
    def spec(**kwargs):
        return SpeculativeConfig(draft_model="head", **kwargs)

    assert speculation_policy_from_config(spec(policy="off")).name == "off"
    assert speculation_policy_from_config(spec(method=None, policy="fixed")).name == "off"
    assert speculation_policy_from_config(spec(num_draft_tokens=6)).num_draft_tokens == 6
    # Adaptive budgets stop at the tree depth (the goodput model values depth, not width).
    adaptive = speculation_policy_from_config(
        spec(policy="adaptive", num_draft_tokens=6, max_depth=5)
    )
    assert isinstance(adaptive, AdaptiveSpeculation) and adaptive.max_draft_tokens == 5
    adaptive = speculation_policy_from_config(
        spec(policy="adaptive", num_draft_tokens=3, max_depth=5)
    )
    assert adaptive.max_draft_tokens == 3
