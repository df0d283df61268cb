"""What an engine reports about its own work: one record per step (an instance's cost-model
samples), and the expert load of an interval from two cumulative reads."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from raycake.model.moe import MoEStats


@dataclass(frozen=True)
class StepRecord:
    """What one step computed and how long it took: samples for an instance's cost model."""

    num_tokens: int  # tokens computed
    num_requests: int  # requests in the step (a pure decode step has one token each)
    num_context_tokens: int  # tokens attended to: everything before the step plus the step
    seconds: float
    num_draft_tokens: int = 0  # of num_tokens, draft tree nodes verified (speculation)

    @property
    def is_decode_only(self) -> bool:
        """No prompt chunk in the step: one token per request, plus verified draft tokens (a
        speculating instance's decode steps all verify drafts)."""
        return self.num_tokens - self.num_draft_tokens == self.num_requests


def moe_load_since(
    current: dict[int, MoEStats], baseline: dict[int, MoEStats]
) -> dict[int, MoEStats]:
    """The expert load between two reads of ``LLMEngine.moe_stats()``, per layer (a layer
    missing from ``baseline`` counts from zero).

    NOTE: every ``MoEStats`` field but ``num_experts`` is a count summed over steps (an int or
    a list of ints), so the difference is taken field by field.
    """
    window = {}
    for layer, now in current.items():
        before = baseline.get(layer)
        if before is None:
            window[layer] = copy.deepcopy(now)
            continue
        counts = {}
        for f in dataclasses.fields(now):
            if f.name == "num_experts":
                continue
            a, b = getattr(now, f.name), getattr(before, f.name)
            counts[f.name] = (
                [x - y for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a - b
            )
        window[layer] = dataclasses.replace(now, **counts)
    return window
