"""The step-cost model the scheduling tests work their numbers out by hand with.

Prefill: 0.02 + 2e-4 x new + 1e-7 x new x (cached + new / 2) seconds; decode steps:
0.01 + 5e-4 x batch + 1e-6 x context seconds. A 1,024-token prompt:
"""

from __future__ import annotations

from raycake.policies.step_cost_model import StepCostModel

COST = StepCostModel(
    prefill_fixed_s=0.02,
    prefill_per_token_s=2e-4,
    prefill_per_token_pair_s=1e-7,
    decode_fixed_s=0.01,
    decode_per_seq_s=5e-4,
    decode_per_context_token_s=1e-6,
)
FROM_SCRATCH_S = 0.02 + 0.2048 + 0.0524288  # prefill(1024, 0)
WITH_PREFIX_S = 0.02 + 0.0512 + 0.0229376  # prefill(256, 768): a 48-block prefix cached
