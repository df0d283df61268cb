"""How long an instance's steps take: a small regression that the conductor and the simulator share.

An instance measures its own prefill chunks and decode steps, fits a ``StepCostModel`` with
``StepCostModel.fit`` and ships ``to_dict()`` to the conductor, which predicts TTFT and TBT with
it (Mooncake's conductor uses such a regression, fitted offline). Pure Python: no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from raycake.validation import is_count, is_number, require


def attention_work(num_new_tokens: float, num_cached_tokens: float) -> float:
    """Query-key pairs a causal prefill chunk attends: each new token sees the cached ones and,
    on average, half of the new ones.

    NOTE: additive over chunks, work(a, c) + work(b, c + a) == work(a + b, c), so splitting a
    prefill into chunks adds only the fixed cost of the extra chunks.
    """
    return num_new_tokens * (num_cached_tokens + num_new_tokens / 2)


def transfer_seconds(num_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """Seconds to move ``num_bytes`` at a sustained bandwidth (no per-transfer latency)."""
    require(is_number(num_bytes) and num_bytes >= 0, "num_bytes", "a finite number >= 0", num_bytes)
    require(
        is_number(bandwidth_bytes_per_s) and bandwidth_bytes_per_s > 0,
        "bandwidth_bytes_per_s",
        "a finite number > 0",
        bandwidth_bytes_per_s,
    )
    return num_bytes / bandwidth_bytes_per_s


@dataclass(frozen=True)
class PrefillSample:
    """One measured prefill chunk: ``num_new_tokens`` computed after ``num_cached_tokens``."""

    num_new_tokens: int
    num_cached_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        require(
            is_count(self.num_new_tokens, 1),
            "PrefillSample.num_new_tokens",
            "an integer >= 1",
            self.num_new_tokens,
        )
        require(
            is_count(self.num_cached_tokens, 0),
            "PrefillSample.num_cached_tokens",
            "an integer >= 0",
            self.num_cached_tokens,
        )
        require(
            is_number(self.seconds) and self.seconds > 0,
            "PrefillSample.seconds",
            "a finite number > 0",
            self.seconds,
        )


@dataclass(frozen=True)
class DecodeSample:
    """One measured decode step over ``batch_size`` sequences holding ``total_context_tokens``."""

    batch_size: int
    total_context_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        require(
            is_count(self.batch_size, 1),
            "DecodeSample.batch_size",
            "an integer >= 1",
            self.batch_size,
        )
        require(
            is_count(self.total_context_tokens, 0),
            "DecodeSample.total_context_tokens",
            "an integer >= 0",
            self.total_context_tokens,
        )
        require(
            is_number(self.seconds) and self.seconds > 0,
            "DecodeSample.seconds",
            "a finite number > 0",
            self.seconds,
        )


@dataclass(frozen=True, kw_only=True)
class StepCostModel:
    """Step times as fixed + linear + attention terms; every coefficient is >= 0.

    prefill_seconds(n, c) = prefill_fixed_s + prefill_per_token_s * n
                            + prefill_per_token_pair_s * attention_work(n, c)
    decode_step_seconds(b, t) = decode_fixed_s + decode_per_seq_s * b + decode_per_context_token_s * t
    """

    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_token_pair_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    decode_per_context_token_s: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            require(
                is_number(value) and value >= 0,
                f"cost_model.{f.name}",
                "a finite number >= 0",
                value,
            )

    def prefill_seconds(self, num_new_tokens: int, num_cached_tokens: int) -> float:
        """Seconds to compute ``num_new_tokens`` prompt tokens after ``num_cached_tokens`` cached ones;
        0 when there is nothing to compute."""
        if num_new_tokens < 0 or num_cached_tokens < 0:
            raise ValueError(
                f"prefill_seconds: expected token counts >= 0, got "
                f"num_new_tokens={num_new_tokens}, num_cached_tokens={num_cached_tokens}"
            )
        if num_new_tokens == 0:
            return 0.0
        return (
            self.prefill_fixed_s
            + self.prefill_per_token_s * num_new_tokens
            + self.prefill_per_token_pair_s * attention_work(num_new_tokens, num_cached_tokens)
        )

    def decode_step_seconds(self, batch_size: float, total_context_tokens: float) -> float:
        """Seconds for one decode step; fractional arguments are predicted loads. 0 for an empty batch."""
        if batch_size < 0 or total_context_tokens < 0:
            raise ValueError(
                f"decode_step_seconds: expected values >= 0, got batch_size={batch_size}, "
                f"total_context_tokens={total_context_tokens}"
            )
        if batch_size == 0:
            return 0.0
        return (
            self.decode_fixed_s
            + self.decode_per_seq_s * batch_size
            + self.decode_per_context_token_s * total_context_tokens
        )

    @classmethod
    def fit(
        cls, prefill_samples: Sequence[PrefillSample], decode_samples: Sequence[DecodeSample]
    ) -> StepCostModel:
        """Least squares on relative error with non-negative coefficients over measured samples.

        Each sample's row and target are divided by its measured seconds, so a 1 ms decode step
        counts as much as a 500 ms one: timing noise scales with the step, and plain least
        squares would fit the long steps and miss the short ones by tens of percent.

        Each half needs at least 3 distinct sample points that vary the features independently
        (e.g. prefill at several lengths and cache hits; decode at several batch sizes and
        context lengths, not a fixed context per sequence); otherwise a ``ValueError`` says which.
        """
        for name, samples, kind in (
            ("prefill_samples", prefill_samples, PrefillSample),
            ("decode_samples", decode_samples, DecodeSample),
        ):
            bad = [s for s in samples if not isinstance(s, kind)]
            require(not bad, name, f"{kind.__name__} items", bad[:1])
        prefill = _fit_nonnegative(
            "prefill_samples",
            "(num_new_tokens, num_cached_tokens)",
            [
                (
                    1.0,
                    float(s.num_new_tokens),
                    attention_work(s.num_new_tokens, s.num_cached_tokens),
                )
                for s in prefill_samples
            ],
            [s.seconds for s in prefill_samples],
        )
        decode = _fit_decode(decode_samples)
        return cls(
            prefill_fixed_s=prefill[0],
            prefill_per_token_s=prefill[1],
            prefill_per_token_pair_s=prefill[2],
            decode_fixed_s=decode[0],
            decode_per_seq_s=decode[1],
            decode_per_context_token_s=decode[2],
        )

    def refit_decode(self, decode_samples: Sequence[DecodeSample]) -> StepCostModel:
        """This model with its decode half fitted to ``decode_samples`` (same rules as ``fit``;
        a ``ValueError`` when they do not determine it): a decode instance's recent steps say
        how fast it runs now, on a node that got busier or quieter since its start-up fit."""
        bad = [s for s in decode_samples if not isinstance(s, DecodeSample)]
        require(not bad, "decode_samples", "DecodeSample items", bad[:1])
        decode = _fit_decode(decode_samples)
        return replace(
            self,
            decode_fixed_s=decode[0],
            decode_per_seq_s=decode[1],
            decode_per_context_token_s=decode[2],
        )

    def to_dict(self) -> dict[str, float]:
        """Plain JSON-able coefficients."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCostModel:
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown or missing:
            raise ValueError(f"cost_model: unknown field(s) {unknown}, missing field(s) {missing}")
        return cls(**data)


def _fit_decode(samples: Sequence[DecodeSample]) -> tuple[float, ...]:
    """(decode_fixed_s, decode_per_seq_s, decode_per_context_token_s) fitted to ``samples``."""
    return _fit_nonnegative(
        "decode_samples",
        "(batch_size, total_context_tokens)",
        [(1.0, float(s.batch_size), float(s.total_context_tokens)) for s in samples],
        [s.seconds for s in samples],
    )


def _fit_nonnegative(
    name: str, point_names: str, rows: list[tuple[float, ...]], targets: list[float]
) -> tuple[float, ...]:
    """argmin sum(((x . w - y) / y)^2) subject to w >= 0, for a handful of features.

    The constrained optimum is the unconstrained least-squares fit restricted to its non-zero
    coefficients, so trying every subset of features and keeping the best feasible fit is exact
    (2**3 subsets here). Columns are scaled to unit norm first so the normal equations of
    features of very different magnitudes (1 vs. millions of token pairs) stay well conditioned.
    """
    num_features = len(rows[0]) if rows else 3
    num_distinct = len(set(rows))
    require(
        num_distinct >= num_features,
        name,
        f"at least {num_features} distinct {point_names} points",
        f"{num_distinct} distinct point(s) in {len(rows)} sample(s)",
    )
    # Relative error: ordinary least squares on rows and targets divided by the targets.
    rows = [tuple(x / y for x in row) for row, y in zip(rows, targets, strict=True)]
    targets = [1.0] * len(targets)
    norms = [math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(num_features)]
    collinear = ValueError(
        f"{name}: the samples do not determine all {num_features} coefficients (collinear "
        f"features); vary each of {point_names} independently"
    )
    if min(norms) == 0:
        raise collinear
    scaled = [[row[j] / norms[j] for j in range(num_features)] for row in rows]
    gram = [
        [sum(row[i] * row[j] for row in scaled) for j in range(num_features)]
        for i in range(num_features)
    ]
    moments = [
        sum(row[i] * y for row, y in zip(scaled, targets, strict=True)) for i in range(num_features)
    ]
    if _solve(gram, moments) is None:
        raise collinear
    best = [0.0] * num_features
    best_error = sum(y * y for y in targets)
    for mask in range(1, 2**num_features):
        kept = [j for j in range(num_features) if mask >> j & 1]
        # A principal submatrix of a positive definite Gram matrix is itself non-singular.
        solution = _solve([[gram[i][j] for j in kept] for i in kept], [moments[i] for i in kept])
        if solution is None or min(solution) < 0:
            continue
        weights = [0.0] * num_features
        for j, value in zip(kept, solution, strict=True):
            weights[j] = value
        error = sum(
            (y - sum(w * x for w, x in zip(weights, row, strict=True))) ** 2
            for row, y in zip(scaled, targets, strict=True)
        )
        if error < best_error:
            best, best_error = weights, error
    return tuple(w / norm for w, norm in zip(best, norms, strict=True))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (numerically) singular.

    Expects a Gram matrix of unit-norm columns (unit diagonal), so the pivot tolerance is absolute.
    """
    n = len(rhs)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= factor * a[col][c]
    solution = [0.0] * n
    for r in reversed(range(n)):
        tail = sum(a[r][c] * solution[c] for c in range(r + 1, n))
        solution[r] = (a[r][n] - tail) / a[r][r]
    return solution
