"""Mooncake-format request traces: read (validated, into pyarrow), generate, rescale.

One JSON object per line: ``timestamp`` (ms from the trace start), ``input_length`` and
``output_length`` (tokens), ``hash_ids`` (chained hashes of the prompt's 512-token blocks,
``len(hash_ids) == ceil(input_length / 512)``; equal leading ids mean a shared prefix). The
published traces (FAST'25 release: conversation, tool-and-agent, synthetic) all use it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from raycake.validation import is_int

TRACE_BLOCK_SIZE = 512
TRACE_SCHEMA = pa.schema(
    [
        ("timestamp_ms", pa.int64()),
        ("input_length", pa.int64()),
        ("output_length", pa.int64()),
        ("hash_ids", pa.list_(pa.int64())),
    ]
)
# Errors listed in one TraceFormatError before the rest are only counted.
MAX_REPORTED_ERRORS = 10


class TraceFormatError(ValueError):
    """A trace file with malformed lines; ``errors`` holds (line number, message) pairs."""

    def __init__(self, path: str, errors: list[tuple[int, str]], num_errors: int) -> None:
        self.path = path
        self.errors = errors
        self.num_errors = num_errors
        lines = "\n".join(f"  line {n}: {message}" for n, message in errors)
        more = f"\n  ... and {num_errors - len(errors)} more" if num_errors > len(errors) else ""
        super().__init__(
            f"{path}: {num_errors} malformed line(s) in a Mooncake trace:\n{lines}{more}"
        )


def parse_trace_line(line: str, block_size: int = TRACE_BLOCK_SIZE) -> tuple[int, int, int, list]:
    """(timestamp_ms, input_length, output_length, hash_ids) of one line; ValueError naming the
    field otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [
        k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in record
    ]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    timestamp = record["timestamp"]
    # Some exporters write integral float timestamps; keep them, reject fractional ones.
    if isinstance(timestamp, float) and timestamp.is_integer():
        timestamp = int(timestamp)
    if not is_int(timestamp) or timestamp < 0:
        raise ValueError(f"timestamp: expected an integer >= 0 (ms), got {record['timestamp']!r}")
    for name in ("input_length", "output_length"):
        if not is_int(record[name]) or record[name] < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {record[name]!r}")
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or not all(is_int(h) for h in hash_ids):
        raise ValueError(f"hash_ids: expected a list of integers, got {str(hash_ids)[:60]}")
    expected = -(-record["input_length"] // block_size)
    if len(hash_ids) != expected:
        raise ValueError(
            f"hash_ids: expected ceil(input_length / {block_size}) = {expected} ids for "
            f"input_length {record['input_length']}, got {len(hash_ids)}"
        )
    return timestamp, record["input_length"], record["output_length"], hash_ids


def read_trace(path: str | Path, *, block_size: int = TRACE_BLOCK_SIZE) -> pa.Table:
    """A Mooncake JSONL trace as a table with ``TRACE_SCHEMA``, in file order.

    Raises ``FileNotFoundError``; ``ValueError`` for an empty file or one whose first record is
    not a JSON trace object (e.g. a CSV or a Parquet file); ``TraceFormatError`` listing the
    line numbers of malformed lines otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace: no such file {str(path)!r}")
    columns: tuple[list, list, list, list] = ([], [], [], [])
    errors: list[tuple[int, str]] = []
    num_errors = num_records = 0
    with path.open("rb") as raw:
        for line_no, raw_line in enumerate(raw, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                line = None
            if line is not None and not line.strip():
                continue
            try:
                if line is None:
                    raise ValueError("not UTF-8 text")
                fields = parse_trace_line(line, block_size)
            except ValueError as exc:
                if num_records == 0 and num_errors == 0:
                    # The very first record is broken: most likely not a trace at all.
                    raise ValueError(
                        f"{path}: not a Mooncake JSONL trace (line {line_no}: {exc}); expected "
                        'one JSON object per line like {"timestamp": 0, "input_length": 600, '
                        '"output_length": 20, "hash_ids": [0, 1]}'
                    ) from None
                num_errors += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append((line_no, str(exc)))
                continue
            num_records += 1
            for column, value in zip(columns, fields, strict=True):
                column.append(value)
    if num_errors:
        raise TraceFormatError(str(path), errors, num_errors)
    if num_records == 0:
        raise ValueError(f"{path}: empty trace (no requests)")
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=TRACE_SCHEMA)


def trace_from_rows(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A trace table from Mooncake-style dicts (``timestamp`` or ``timestamp_ms`` keys), validated."""
    columns: tuple[list, list, list, list] = ([], [], [], [])
    for i, row in enumerate(rows):
        row = dict(row)
        if "timestamp_ms" in row:
            row["timestamp"] = row.pop("timestamp_ms")
        try:
            fields = parse_trace_line(json.dumps(row))
        except ValueError as exc:
            raise ValueError(f"row {i}: {exc}") from None
        for column, value in zip(columns, fields, strict=True):
            column.append(value)
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=TRACE_SCHEMA)


def write_trace(trace: pa.Table, path: str | Path) -> Path:
    """Write ``trace`` as Mooncake JSONL (the format ``read_trace`` reads)."""
    path = Path(path)
    columns = [trace.column(name).to_pylist() for name in TRACE_SCHEMA.names]
    with path.open("w") as f:
        for ts, n_in, n_out, hashes in zip(*columns, strict=True):
            f.write(
                json.dumps(
                    {
                        "timestamp": ts,
                        "input_length": n_in,
                        "output_length": n_out,
                        "hash_ids": hashes,
                    }
                )
                + "\n"
            )
    return path


# --- Rescaling ------------------------------------------------------------------------------


def speed_up(trace: pa.Table, factor: float) -> pa.Table:
    """Arrivals ``factor`` times as dense: timestamps divided by ``factor`` (2.0 = twice the rate)."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ValueError(f"speed factor: expected a number > 0, got {factor!r}")
    if not math.isfinite(factor):
        raise ValueError(f"speed factor: expected a finite number, got {factor!r}")
    timestamps = [round(t / factor) for t in trace.column("timestamp_ms").to_pylist()]
    return trace.set_column(0, "timestamp_ms", pa.array(timestamps, pa.int64()))


def head(trace: pa.Table, num_requests: int) -> pa.Table:
    """The first ``num_requests`` requests."""
    if not is_int(num_requests) or num_requests < 1:
        raise ValueError(f"num_requests: expected an integer >= 1, got {num_requests!r}")
    return trace.slice(0, num_requests)


def repeat(trace: pa.Table, times: int) -> pa.Table:
    """``times`` back-to-back copies; each copy's hash ids are offset so copies share no prefix
    (a longer trace with the same statistics, e.g. for speed tests)."""
    if not is_int(times) or times < 1:
        raise ValueError(f"times: expected an integer >= 1, got {times!r}")
    timestamps = trace.column("timestamp_ms").to_pylist()
    hashes = trace.column("hash_ids").to_pylist()
    span = (max(timestamps) - min(timestamps)) if timestamps else 0
    gap = span // max(1, len(timestamps) - 1)
    id_offset = 1 + max((max(h) for h in hashes if h), default=0)
    out_ts: list[int] = []
    out_hashes: list[list[int]] = []
    for copy in range(times):
        out_ts += [t + copy * (span + gap) for t in timestamps]
        out_hashes += [[x + copy * id_offset for x in h] for h in hashes]
    return pa.Table.from_arrays(
        [
            pa.array(out_ts, pa.int64()),
            pa.array(trace.column("input_length").to_pylist() * times, pa.int64()),
            pa.array(trace.column("output_length").to_pylist() * times, pa.int64()),
            pa.array(out_hashes, pa.list_(pa.int64())),
        ],
        schema=TRACE_SCHEMA,
    )


def prefix_reuse_ceiling(trace: pa.Table, block_size: int = TRACE_BLOCK_SIZE) -> float:
    """Share of prompt tokens an unlimited global prefix cache could serve, in arrival order.

    A request reuses its leading blocks seen before, capped at (input_length - 1) // block_size
    full blocks (one token is always computed for the first output's logits); it then
    contributes its own full blocks.
    """
    seen: set[int] = set()
    cached = total = 0
    lengths = trace.column("input_length").to_pylist()
    for n, hashes in zip(lengths, trace.column("hash_ids").to_pylist(), strict=True):
        hit = 0
        for h in hashes[: (n - 1) // block_size]:
            if h not in seen:
                break
            hit += 1
        cached += hit * block_size
        total += n
        seen.update(hashes[: n // block_size])
    return cached / total if total else 0.0


# --- Synthetic traces -----------------------------------------------------------------------

ARRIVAL_PROCESSES = ("poisson", "gamma", "mmpp")


@dataclass(frozen=True, kw_only=True)
class SyntheticTraceConfig:
    """A mix of multi-turn chat sessions, tool/agent calls and one-off requests.

    Chat sessions grow: each turn's prompt is the previous prompt + the previous answer + a new
    user message, so consecutive turns share all but the last blocks. Agent calls reuse one of a
    few long shared contexts (system prompt + tool schemas) followed by a short unique tail.
    """

    num_requests: int = 1000
    # Mean arrivals per second over the whole trace.
    rate_per_s: float = 4.0
    # poisson: exponential gaps; gamma: gaps with coefficient of variation ``burstiness``;
    # mmpp: a two-state Markov-modulated Poisson process alternating calm and bursts.
    arrival: str = "poisson"
    burstiness: float = 3.0
    # Shares of requests by kind; the rest are one-off prompts sharing nothing.
    session_share: float = 0.5
    agent_share: float = 0.3
    num_agent_contexts: int = 8
    agent_context_tokens: int = 6000
    turns_per_session: int = 5
    first_turn_tokens: int = 2000
    turn_growth_tokens: int = 800
    single_prompt_tokens: int = 3000
    mean_output_tokens: int = 150
    max_input_tokens: int = 120_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_requests",
            "num_agent_contexts",
            "agent_context_tokens",
            "turns_per_session",
            "first_turn_tokens",
            "turn_growth_tokens",
            "single_prompt_tokens",
            "mean_output_tokens",
            "max_input_tokens",
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"synthetic_trace.{name}: expected an integer >= 1, got {value!r}")
        for name in ("rate_per_s", "burstiness"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"synthetic_trace.{name}: expected a number > 0, got {value!r}")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(
                f"synthetic_trace.arrival: expected one of {ARRIVAL_PROCESSES}, got {self.arrival!r}"
            )
        for name in ("session_share", "agent_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(
                    f"synthetic_trace.{name}: expected a share in [0, 1], got {value!r}"
                )
        if self.session_share + self.agent_share > 1:
            raise ValueError(
                "synthetic_trace.agent_share: session_share + agent_share must be <= 1, got "
                f"{self.session_share} + {self.agent_share}"
            )
        if not is_int(self.seed):
            raise ValueError(f"synthetic_trace.seed: expected an integer, got {self.seed!r}")


def _arrival_gaps_s(config: SyntheticTraceConfig, rng: random.Random) -> Iterator[float]:
    mean_gap = 1.0 / config.rate_per_s
    if config.arrival == "poisson":
        while True:
            yield rng.expovariate(config.rate_per_s)
    elif config.arrival == "gamma":
        # Gamma gaps with the same mean and CV = burstiness: shape k = 1 / CV^2.
        shape = 1.0 / config.burstiness**2
        while True:
            yield rng.gammavariate(shape, mean_gap / shape)
    else:
        # Two states with equal expected dwell (~20 mean gaps); the burst state's rate is
        # ``burstiness`` times the calm one, scaled so the overall mean rate is rate_per_s.
        calm = 2 * config.rate_per_s / (1 + config.burstiness)
        rates = (calm, calm * config.burstiness)
        state, dwell_left, waited = 0, rng.expovariate(1 / (20 * mean_gap)), 0.0
        while True:
            gap = rng.expovariate(rates[state])
            if gap < dwell_left:
                dwell_left -= gap
                yield waited + gap
                waited = 0.0
            else:
                # The state ends first; the wait restarts at the new rate (memoryless).
                waited += dwell_left
                state = 1 - state
                dwell_left = rng.expovariate(1 / (20 * mean_gap))


def generate_trace(config: SyntheticTraceConfig, path: str | Path | None = None) -> pa.Table:
    """A seeded synthetic trace with ``TRACE_SCHEMA``; also written as JSONL when ``path`` is set."""
    rng = random.Random(config.seed)
    next_id = 0

    def new_blocks(num_blocks: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + num_blocks))
        next_id += num_blocks
        return ids

    def extend(prefix_tokens: int, prefix_ids: list[int], new_tokens: int) -> tuple[int, list]:
        """Prompt = the prefix's tokens + new ones; its full blocks keep their ids, the partial
        last block and all later blocks get new ones (their content changed)."""
        total = min(config.max_input_tokens, prefix_tokens + new_tokens)
        kept = prefix_ids[: min(prefix_tokens, total) // TRACE_BLOCK_SIZE]
        return total, kept + new_blocks(-(-total // TRACE_BLOCK_SIZE) - len(kept))

    def output_length() -> int:
        return max(
            1,
            min(
                4 * config.mean_output_tokens, round(rng.expovariate(1 / config.mean_output_tokens))
            ),
        )

    def jitter(tokens: int) -> int:
        return max(1, round(tokens * rng.uniform(0.5, 1.5)))

    agent_contexts = [
        extend(0, [], jitter(config.agent_context_tokens)) for _ in range(config.num_agent_contexts)
    ]
    # Open sessions: [prompt tokens, hash ids, turns left]; a new turn continues a random one.
    sessions: list[list] = []
    gaps = _arrival_gaps_s(config, rng)
    now_s = 0.0
    columns: tuple[list, list, list, list] = ([], [], [], [])
    for _ in range(config.num_requests):
        kind = rng.random()
        n_out = output_length()
        if kind < config.session_share:
            if sessions and rng.random() < 0.7:
                session = rng.choice(sessions)
                n_in, ids = extend(session[0], session[1], jitter(config.turn_growth_tokens))
                session[2] -= 1
                if session[2] <= 0 or n_in >= config.max_input_tokens:
                    sessions.remove(session)
            else:
                n_in, ids = extend(0, [], jitter(config.first_turn_tokens))
                session = [n_in, ids, config.turns_per_session - 1]
                if session[2] > 0:
                    sessions.append(session)
            # The next turn's prompt also holds this turn's answer.
            session[0], session[1] = extend(n_in, ids, n_out)
        elif kind < config.session_share + config.agent_share:
            context_tokens, context_ids = rng.choice(agent_contexts)
            n_in, ids = extend(context_tokens, context_ids, jitter(300))
        else:
            n_in, ids = extend(0, [], jitter(config.single_prompt_tokens))
        columns[0].append(round(now_s * 1000))
        columns[1].append(n_in)
        columns[2].append(n_out)
        columns[3].append(ids)
        now_s += next(gaps)
    trace = pa.Table.from_arrays(
        [pa.array(c, t) for c, t in zip(columns, TRACE_SCHEMA.types, strict=True)],
        schema=TRACE_SCHEMA,
    )
    if path is not None:
        write_trace(trace, path)
    return trace
