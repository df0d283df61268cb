"""Helpers shared by the benchmark scripts: held-out prompts, timing, result tables."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_columns() -> dict[str, object]:
    """The columns every engine result row ends with: torch's thread count and the machine
    (architecture and CPU count)."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def held_out_prompts(tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts of exactly ``prompt_tokens`` tokens from held-out stdlib files (never trained on)."""
    from raycake.training.corpus import read_texts, split_corpus

    prompts: list[list[int]] = []
    for text in read_texts(split_corpus().held_out):
        ids = tokenizer.encode(text)
        for start in range(0, len(ids) - prompt_tokens, prompt_tokens * 4):
            prompts.append(ids[start : start + prompt_tokens])
            if len(prompts) == num_prompts:
                return prompts
    raise RuntimeError(
        f"held-out corpus yields only {len(prompts)} prompts of {prompt_tokens} tokens"
    )


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_table(rows: list[dict], name: str, out_dir: Path = RESULTS_DIR) -> Path:
    """Save rows as Parquet and CSV under ``out_dir`` (benchmarks/results/ unless given);
    return the Parquet path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    path = out_dir / f"{name}.parquet"
    pq.write_table(table, path)
    pa_csv.write_csv(table, out_dir / f"{name}.csv")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(widths[c]) for c in columns))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
