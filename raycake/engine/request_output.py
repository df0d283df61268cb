"""What callers get back: finished outputs and streamed deltas, with per-request timing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Monotonic timestamps (seconds) of one request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    # Speculative decoding: tokens emitted by each verify step (accepted drafts + 1), the
    # seconds those steps took (drafting and verifying), and what the same steps would have
    # taken without drafts, by the engine's fitted step-cost model.
    spec_acceptance_lengths: list[int] = field(default_factory=list)
    spec_step_seconds: float = 0.0
    spec_plain_step_seconds: float = 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tbt(self) -> list[float]:
        """Time between consecutive output tokens (one entry per token after the first)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def mean_tbt(self) -> float | None:
        gaps = self.tbt
        return sum(gaps) / len(gaps) if gaps else None

    @property
    def spec_mean_acceptance_length(self) -> float | None:
        """Tokens per target pass over this request's verify steps; None if it never drafted."""
        lengths = self.spec_acceptance_lengths
        return sum(lengths) / len(lengths) if lengths else None

    @property
    def spec_speedup(self) -> float | None:
        """Estimated decoding speedup over its verify steps: tokens per second with drafts over
        one token per estimated plain step (None if it never drafted)."""
        mean = self.spec_mean_acceptance_length
        if mean is None or self.spec_step_seconds <= 0:
            return None
        return mean * self.spec_plain_step_seconds / self.spec_step_seconds


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while running


@dataclass
class RequestOutput:
    """One request's result, shaped like vLLM's: ``outputs[0].text``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    metrics: RequestMetrics
    # Why the request failed when ``finish_reason == "error"``; None otherwise.
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True)
class StreamDelta:
    """New text and tokens of one request since the previous step."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    # Why the request failed when ``finish_reason == "error"``; None otherwise.
    error: str | None = None
