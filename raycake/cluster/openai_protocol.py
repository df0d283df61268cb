"""The OpenAI API's request and response shapes for ``/v1/completions`` and
``/v1/chat/completions``, as vLLM serves them, and their mapping onto raycake's requests.

Requests are strict pydantic models: booleans are not numbers, numbers are finite, strings are
not numbers, unknown fields are errors (a typo must not be silently ignored). raycake's extras sit
at the top level of the body, as vLLM's do: ``top_k``, ``ignore_eos``, ``stop_token_ids``, and
the per-request SLOs ``ttft_slo_s`` / ``tbt_slo_s`` the conductor admits against. Fields the
engine cannot honour (``logprobs``, penalties, tools...) are accepted only at their defaults and
otherwise refused with a 400 that names them, never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raycake.cluster.admission import ModelLimits, prompt_token_ids
from raycake.engine.sampling_params import SEED_MAX, SamplingParams
from raycake.model.tokenizer import Tokenizer

# Choices per prompt: each is one request through the cluster, so n is capped.
MAX_N = 16
# What OpenAI's legacy completions endpoint generates when max_tokens is absent.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """The sampling fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)  # None: 1.0, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    # Not in the engine: accepted at their defaults only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # raycake's extras (vLLM's are top-level body fields too).
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's and raycake's spellings)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    ttft_slo_s: float | None = Field(None, gt=0)
    tbt_slo_s: float | None = Field(None, gt=0)

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something the engine cannot do."""
        found = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                found.append((name, "0 (raycake's sampler has no penalties)"))
        if self.logit_bias:
            found.append(("logit_bias", "null or {} (raycake's sampler has no logit bias)"))
        return found


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs is not None:
            found.append(("logprobs", "null (raycake's engine does not return log probabilities)"))
        if self.echo:
            found.append(("echo", "false"))
        if self.suffix is not None:
            found.append(("suffix", "null (raycake does not fill in the middle)"))
        if self.best_of not in (None, self.n):
            found.append(("best_of", f"null or n ({self.n}): raycake does not rank choices"))
        return found


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs:
            found.append(("logprobs", "false (raycake's engine does not return log probabilities)"))
        if self.top_logprobs is not None:
            found.append(
                ("top_logprobs", "null (raycake's engine does not return log probabilities)")
            )
        if self.tools:
            found.append(("tools", "null or [] (raycake does not call tools)"))
        if self.tool_choice not in (None, "none"):
            found.append(("tool_choice", "null or 'none' (raycake does not call tools)"))
        if self.response_format not in (None, {"type": "text"}):
            found.append(("response_format", "null or {'type': 'text'}"))
        return found


@dataclass(frozen=True)
class Choice:
    """One choice of a response: one request through the cluster."""

    index: int
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    """A request's choices, each checked against the model, before any work."""

    prompt_token_ids: list[list[int]]  # one per prompt
    choices: list[Choice]  # prompt-major: choice ``i * n + j`` is prompt i's j-th
    include_usage: bool
    ttft_slo_s: float | None
    tbt_slo_s: float | None


class ContextLengthError(ValueError):
    """A prompt, or prompt + max_tokens, beyond the model's context."""


def plan_completion(req: CompletionRequest, tokenizer: Tokenizer, limits: ModelLimits) -> Plan:
    """The choices of a completion request; ``ValueError`` (naming the field) if it is invalid."""
    _check_supported(req)
    prompts = _prompts(req.prompt)
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(prompt_token_ids(prompt, tokenizer, limits))
        except ValueError as exc:
            raise ValueError(_at_prompt(str(exc), i, len(prompts))) from None
    return _plan(req, ids, "prompt", req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, limits)


def plan_chat(req: ChatCompletionRequest, tokenizer: Tokenizer, limits: ModelLimits) -> Plan:
    """The choices of a chat request: the messages rendered by the model's chat template."""
    _check_supported(req)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = prompt_token_ids(text, tokenizer, limits)
    max_tokens = req.max_completion_tokens or req.max_tokens
    # vLLM's default: whatever the context leaves after the prompt.
    if max_tokens is None:
        max_tokens = max(1, limits.max_model_len - len(ids))
    return _plan(req, [ids], "messages", max_tokens, limits)


def _check_supported(req: _GenerationRequest) -> None:
    for name, expected in req.unsupported():
        raise ValueError(f"{name}: expected {expected}, got {getattr(req, name)!r}")
    if req.stream_options is not None and not req.stream:
        raise ValueError(
            f"stream_options: expected null unless stream is true, got {req.stream_options.model_dump()}"
        )
    # Choice i samples with seed + i: a valid seed whose last choice's is not (any other bad
    # seed is SamplingParams' to name).
    if req.seed is not None and req.seed <= SEED_MAX < req.seed + req.n - 1:
        raise ValueError(
            f"seed: expected at most {SEED_MAX - req.n + 1} (choice i samples with seed + i, "
            f"and n is {req.n}), got {req.seed}"
        )


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ValueError("prompt: expected at least one prompt, got []")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _at_prompt(message: str, index: int, count: int) -> str:
    return message if count == 1 else f"{message} (prompt {index})"


def _plan(
    req: _GenerationRequest,
    prompt_ids: list[list[int]],
    prompt_field: str,
    max_tokens: int,
    limits: ModelLimits,
) -> Plan:
    context = limits.max_model_len
    for i, ids in enumerate(prompt_ids):
        where = "" if len(prompt_ids) == 1 else f" (prompt {i})"
        if len(ids) >= context:
            raise ContextLengthError(
                f"{prompt_field}: expected at most {context - 1} tokens (this model's maximum "
                f"context length is {context} tokens), got {len(ids)} tokens{where}"
            )
        if len(ids) + max_tokens > context:
            raise ContextLengthError(
                f"max_tokens: expected at most {context - len(ids)} (this model's maximum "
                f"context length is {context} tokens and the prompt has {len(ids)}), got "
                f"{max_tokens}{where}"
            )
    choices = []
    for i, ids in enumerate(prompt_ids):
        for j in range(req.n):
            params = SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(0, req.top_k or 0),
                seed=None if req.seed is None else req.seed + j,
                max_tokens=max_tokens,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or ()),
                stop_token_ids=list(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
            )
            choices.append(Choice(len(choices), i, ids, params))
    return Plan(
        prompt_token_ids=prompt_ids,
        choices=choices,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        ttft_slo_s=req.ttft_slo_s,
        tbt_slo_s=req.tbt_slo_s,
    )


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_response(
    meta: ResponseMeta, texts: list[str], reasons: list[str], usage_: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ],
        "usage": usage_,
    }


def chat_response(
    meta: ResponseMeta, texts: list[str], reasons: list[str], usage_: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ],
        "usage": usage_,
    }


def completion_chunk(
    meta: ResponseMeta, index: int, text: str, reason: str | None, with_usage: bool
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return _chunk(meta, "text_completion", choice, with_usage)


def chat_chunk(
    meta: ResponseMeta, index: int, delta: dict[str, str], reason: str | None, with_usage: bool
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return _chunk(meta, "chat.completion.chunk", choice, with_usage)


def _chunk(
    meta: ResponseMeta, kind: str, choice: dict[str, Any], with_usage: bool
) -> dict[str, Any]:
    chunk = {
        "id": meta.id,
        "object": kind,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: every chunk but the last carries a null usage
    return chunk


def usage_chunk(meta: ResponseMeta, obj: str, usage_: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage_,
    }
