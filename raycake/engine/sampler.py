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

    NOTE: the NaN check rides on the greedy argmax, read back in one device sync: the max
    treats NaN as the largest value, so a row holding a NaN has one at its argmax. A NaN row
    would otherwise sample garbage silently or raise in the draw. Non-greedy rows are drawn together (``sample_batch``); if that raises,
    they are drawn again one by one from the same generator states, so only the row at fault
    fails and every other row gets the token the batch would have given it.
    """
    # [2, N]: the greedy answer of each row (cheap, and all a greedy row needs), and its NaN flag.
    # NOTE: max(dim) gives argmax's index (the first maximal value; NaN counts as the largest)
    # and the value there in one pass; argmax itself measured 2-5x slower on CPU (32 x 4096).
    at_argmax, argmax = logits.max(dim=-1)  # [N], [N]
    greedy, has_nan = torch.stack((argmax, at_argmax.isnan().long())).tolist()
    tokens: list[int | SampleError] = list(greedy)
    rows = []
    for i, p in enumerate(params):
        if has_nan[i]:
            tokens[i] = SampleError("sampling: the model's logits contain NaN")
        elif not p.is_greedy:
            rows.append(i)
    if not rows:
        return tokens
    row_params = [params[i] for i in rows]
    row_generators = [generators[i] for i in rows]
    states = [g.get_state() for g in row_generators]
    try:
        drawn: list[int | SampleError] = list(
            sample_batch(logits[rows], row_params, row_generators)
        )
    except Exception:  # find the row at fault; the others draw as the batch would have
        drawn = []
        for i, p, g, state in zip(rows, row_params, row_generators, states, strict=True):
            g.set_state(state)
            try:
                drawn.append(sample_row(logits[i], p, g))
            except Exception as exc:  # this row's request fails; the batch goes on
                drawn.append(SampleError(f"sampling: {type(exc).__name__}: {exc}"))
    for i, token in zip(rows, drawn, strict=True):
        tokens[i] = token
    return tokens


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """Draw one token per row of ``logits`` [R, V] under non-greedy ``params``, all rows at once.

    Each row draws by inverting its cumulative distribution at one uniform number from its own
    generator: over the vocabulary in id order when it has no filter, over its best tokens in
    descending order when it has top-k or top-p. So a row's token depends only on its logits,
    parameters and generator, never on its neighbours, and ``sample_row`` draws the same.
    """
    vocab = logits.shape[-1]
    device = logits.device
    uniform = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators])
    uniform = uniform.to(device)
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scaled = logits / temperature[:, None]
    filtered = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    plain = [i for i in range(len(params)) if i not in set(filtered)]
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    if plain:
        index = torch.tensor(plain, device=device)
        tokens[index] = _invert_cdf(scaled[index].softmax(-1), uniform[index])
    if filtered:
        index = torch.tensor(filtered, device=device)
        tokens[index] = _sample_filtered(
            scaled[index], [params[i] for i in filtered], uniform[index]
        )
    return [int(t) for t in tokens.tolist()]


# Top-p rows draw from the best FIRST_CANDIDATES tokens when those hold the mass (most rows);
# otherwise the candidates double. A full sort of the vocabulary costs ~10x a top-64.
FIRST_CANDIDATES = 64


def _sample_filtered(
    scaled: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p, over each row's best tokens in descending order; [R] token ids."""
    vocab = scaled.shape[-1]
    device = scaled.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # A row's distribution before top-p: its top-k tokens, or the whole vocabulary.
    log_norm = scaled.logsumexp(-1, keepdim=True)  # [R, 1], used by rows without top-k
    needs_k = max(k if k < vocab else FIRST_CANDIDATES for k in top_k)
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)
    limit = torch.tensor(top_k, device=device)[:, None]
    num = min(vocab, needs_k)
    while True:
        values, ids = torch.topk(scaled, num, dim=-1)  # [R, n] best first
        rank = torch.arange(num, device=device)[None, :]
        values = values.masked_fill(rank >= limit, float("-inf"))
        # Probabilities within each row's pre-top-p distribution.
        norm = torch.where(limit < vocab, values.logsumexp(-1, keepdim=True), log_norm)
        probs = (values - norm).exp()
        mass = probs.sum(-1)
        # Exact once the candidates hold top_p of a row's mass (or all of its top-k): every
        # token past them has that much mass before it and is dropped.
        covered = (limit[:, 0] <= num) | (mass >= top_p) | (num == vocab)
        if bool(covered.all()):
            break
        num = min(vocab, num * 2)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    values = values.masked_fill(drop, float("-inf"))
    picked = _invert_cdf(values.softmax(-1), uniform)  # [R] ranks
    return ids.gather(1, picked[:, None])[:, 0]


def _invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of ``probs`` [R, n], the first index whose cumulative mass exceeds u."""
    cdf = probs.cumsum(-1)
    # Scaled by each row's total so rounding in the sum never leaves u above the last entry.
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    return picked[:, 0].clamp_(max=probs.shape[-1] - 1)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row of logits [V] under non-greedy ``params``: the same draw as
    that row gets in ``sample_batch``."""
    return sample_batch(logits[None], [params], [generator])[0]
