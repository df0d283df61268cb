"""Per-request sampling parameters, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field

from raycake.validation import check_bool, check_int, check_number, check_token_ids, is_int, require

# torch.Generator.manual_seed's range: a seed outside it would pass here and fail mid-step.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    Checked on construction (each bad field raises ``ValueError`` naming it); the checks that
    need the model (``top_k`` and ``stop_token_ids`` against the vocabulary, ``max_tokens``
    against ``max_model_len``) run in ``LLMEngine.add_request``.

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
        # NaN, infinities and booleans are rejected here: they would pass a plain comparison
        # and fail (or silently misbehave) inside an engine step.
        check_number("temperature", self.temperature, low=0)
        require(
            is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            "an integer >= 0 (0 disables)",
            self.top_k,
        )
        check_number("top_p", self.top_p, low=0, high=1, low_exclusive=True)
        if self.seed is not None:
            require(
                is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX,
                "seed",
                "None or an integer in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed "
                "accepts)",
                self.seed,
            )
        check_int("max_tokens", self.max_tokens, low=1)
        check_bool("ignore_eos", self.ignore_eos)
        for token_id in self.stop_token_ids:
            require(token_id >= 0, "stop_token_ids", "token ids >= 0", token_id)
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


def check_params_for_model(params: object, vocab_size: int) -> None:
    """The checks of ``params`` that need the model: ``top_k`` and ``stop_token_ids`` against
    its vocabulary (the engine and the cluster's driver both run them before any work)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
    require(
        params.top_k <= vocab_size,
        "top_k",
        f"an integer in [0, {vocab_size}] (0 disables; {vocab_size} is the vocabulary size)",
        params.top_k,
    )
    check_token_ids("stop_token_ids", params.stop_token_ids, vocab_size)
