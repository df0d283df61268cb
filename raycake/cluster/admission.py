"""What the driver checks before a request costs the cluster anything: the prompt's type and
token ids, the sampling parameters against the model (``top_k`` within the vocabulary, stop
token ids in it), and prompt + ``max_tokens`` within the model's context. Every failure is a
``ValueError`` that names the field, so a client learns what to fix and nothing was started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raycake.engine.sampling_params import SamplingParams, check_params_for_model
from raycake.model.tokenizer import Tokenizer
from raycake.validation import check_token_ids, require


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the served model's vocabulary and context."""

    vocab_size: int
    max_model_len: int


def prompt_token_ids(prompt: Any, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    """The prompt's token ids: a string is encoded, a list must hold ids in the vocabulary."""
    if isinstance(prompt, str):
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        check_token_ids("prompt", prompt, limits.vocab_size)
        token_ids = list(prompt)
    else:
        raise ValueError(f"prompt: expected a string or a list of token ids, got {prompt!r:.80}")
    require(bool(token_ids), "prompt", "at least one token", prompt)
    return token_ids


def check_sampling_params(params: Any, num_prompt_tokens: int, limits: ModelLimits) -> None:
    """``params`` against the model (its own fields were checked when it was built)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params: expected a SamplingParams, got {type(params).__name__}")
    check_params_for_model(params, limits.vocab_size)
    total = num_prompt_tokens + params.max_tokens
    require(
        total <= limits.max_model_len,
        "max_tokens",
        f"prompt ({num_prompt_tokens} tokens) + max_tokens <= max_model_len "
        f"({limits.max_model_len}), i.e. max_tokens <= "
        f"{max(0, limits.max_model_len - num_prompt_tokens)}",
        params.max_tokens,
    )


def check_request(prompt: Any, params: Any, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    """Both checks, in order; the prompt's token ids."""
    token_ids = prompt_token_ids(prompt, tokenizer, limits)
    check_sampling_params(params, len(token_ids), limits)
    return token_ids
