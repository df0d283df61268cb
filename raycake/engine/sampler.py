"""Token sampling: greedy, temperature, top-k, top-p, with a generator per request.

Legend: N rows (requests sampling this step), V vocabulary.
"""

from __future__ import annotations

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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[int]:
    """Pick one token per row of ``logits`` [N, V] (fp32) under that row's parameters."""
    greedy = logits.argmax(dim=-1).tolist()  # [N]; cheap, and the answer for greedy rows
    tokens = list(greedy)
    for i, p in enumerate(params):
        if p.is_greedy:
            continue
        row = apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)  # [V]
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
