"""Token sampling: greedy, temperature, top-k, top-p, with a generator per request.

Legend: N rows (requests sampling this step), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycake.engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask one row of logits [V] to its top-k tokens, then to the smallest set with mass >= top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass(frozen=True)
class SampleError:
    """Why one row could not be sampled (its request fails; the other rows are unaffected)."""

    message: str


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[int | SampleError]:
    """One token per row of ``logits`` [N, V], or a ``SampleError`` for a row that failed: a
    NaN in its logits (a poisoned forward) or an exception while drawing it.

    NOTE: the NaN check is one reduction over [N, V], read back in the greedy argmax's one
    device sync. A NaN row would otherwise sample garbage silently (argmax picks the NaN) or
    raise in multinomial.
    """
    # [2, N]: the greedy answer of each row (cheap, and all a greedy row needs), and its NaN flag.
    greedy, has_nan = torch.stack(
        (logits.argmax(dim=-1), logits.isnan().any(dim=-1).long())
    ).tolist()
    tokens: list[int | SampleError] = list(greedy)
    for i, p in enumerate(params):
        if has_nan[i]:
            tokens[i] = SampleError("sampling: the model's logits contain NaN")
            continue
        if p.is_greedy:
            continue
        try:
            tokens[i] = sample_row(logits[i], p, generators[i])
        except Exception as exc:  # this row's request fails; the batch goes on
            tokens[i] = SampleError(f"sampling: {type(exc).__name__}: {exc}")
    return tokens


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row of logits [V] under non-greedy ``params``."""
    row = apply_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = row.softmax(-1)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator).item())
