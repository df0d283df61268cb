"""Per-request sampling parameters, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    ``temperature == 0`` is greedy. ``top_k`` of 0 and ``top_p`` of 1.0 disable those filters.
    A request with a ``seed`` draws from its own generator: same seed, same output, whatever
    else is in the batch.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so params stay hashable and immutable.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, str))
        object.__setattr__(
            self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, int)
        )
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer or None, got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop: expected non-empty strings, got an empty string")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _as_tuple(name: str, value: object, kind: type) -> tuple:
    if isinstance(value, (str, int)):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of {kind.__name__}, got {value!r}")
    for item in value:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ValueError(f"{name}: expected a list of {kind.__name__}, got item {item!r}")
    return tuple(value)
