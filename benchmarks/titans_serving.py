"""Titans MAG served: decode speed and memory per sequence against context length, and
multi-turn TTFT with and without its memory state cached, beside the dense model, in one run.

    python -m benchmarks.titans_serving [--contexts 512,2048,8192,16384] [--batch 2]

1. ``context``: for each context length, ``--batch`` sequences of that many held-out tokens
   decode ``--new-tokens`` tokens each (greedy, EOS ignored) in one engine per model; reported:
   decode tokens/s (first token to last) and the cache bytes each sequence holds while decoding
   (KV blocks it references + its memory-state slot), read from the engine's block tables.
   Ratios are Titans / dense, measured in the same run.
2. ``multi_turn``: sessions whose every turn is the previous prompt + answer + a new line; the
   TTFT of turns 2+ with prefix caching on (Titans: KV *and* memory-state snapshots) and off.

NOTE: the embedded dense model was trained on 2048 positions; for contexts beyond that it is
loaded from a copy of its folder whose config.json says ``max_position_embeddings`` = the
largest context (speed and bytes only: its text there means nothing). Titans attends a window,
so any length is within what it was trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_table
from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.memory_state import memory_state_bytes_per_slot
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.engine.sampling_params import SamplingParams
from raycake.model.loader import DTYPES, resolve_model_path
from raycake.training.corpus import read_texts, split_corpus

FOLLOW_UPS = ["\n\n# Now a test for it:\n", "\n\n# A faster version:\n", "\n\n# Usage example:\n"]


def long_tokens(engine: LLMEngine, num_tokens: int, offset: int) -> list[int]:
    """``num_tokens`` held-out stdlib tokens (files concatenated), starting at file ``offset``."""
    ids: list[int] = []
    for text in read_texts(split_corpus().held_out[offset:]):
        ids.extend(engine.tokenizer.encode(text))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise RuntimeError(f"the held-out corpus has fewer than {num_tokens} tokens")


def with_positions(model_dir: Path, max_positions: int, tmp: Path) -> Path:
    """``model_dir`` itself, or a copy whose config.json allows ``max_positions`` positions."""
    config = json.loads((model_dir / "config.json").read_text())
    if config["max_position_embeddings"] >= max_positions:
        return model_dir
    out = tmp / model_dir.name
    shutil.copytree(model_dir, out)
    config["max_position_embeddings"] = max_positions
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_engine(model_dir: Path, args: argparse.Namespace, max_len: int, **cache) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            dtype=args.dtype,
            cache=CacheConfig(block_size=16, **cache),
            scheduler=SchedulerConfig(max_model_len=max_len, max_num_seqs=args.batch),
        )
    )


def sequence_bytes(engine: LLMEngine, request_id: str) -> int:
    """Cache bytes a running request holds: referenced KV blocks and its memory state."""
    model_config, dtype = engine.model_config, DTYPES[engine.config.dtype]
    blocks = engine.scheduler.kv_cache.num_held_blocks(request_id)
    total = blocks * kv_cache_bytes_per_block(model_config, engine.config.cache.block_size, dtype)
    if engine.runner.memory_pool is not None:
        total += memory_state_bytes_per_slot(engine.model.memories(), dtype)
    return total


def decode_at_context(engine: LLMEngine, context: int, args: argparse.Namespace) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    ids = [
        engine.add_request(long_tokens(engine, context, offset=i), params)
        for i in range(args.batch)
    ]
    started: set[str] = set()  # requests with their first token: prefill done
    decode_start = None
    decoded = 0  # tokens produced once every request decodes
    held = 0
    while engine.has_unfinished_requests():
        deltas = engine.step()
        if decode_start is not None:
            decoded += sum(len(d.token_ids) for d in deltas)
        started.update(d.request_id for d in deltas if d.token_ids)
        if decode_start is None and len(started) == len(ids):
            decode_start = time.perf_counter()
        if all(engine.is_unfinished(r) for r in ids):
            held = max(held, *(sequence_bytes(engine, r) for r in ids))
    elapsed = time.perf_counter() - decode_start
    for rid in ids:
        engine.pop_finished(rid)
    return {"decode_tok_s": decoded / elapsed, "bytes_per_seq": held}


def multi_turn_ttft(engine: LLMEngine, args: argparse.Namespace) -> tuple[float, float]:
    """Mean TTFT (s) and mean cached prompt tokens over turns 2+ of ``--sessions`` sessions."""
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    ttfts, cached = [], []
    for session in range(args.sessions):
        prompt = long_tokens(engine, args.turn_context, offset=args.batch + session)
        for turn in range(args.turns):
            start = time.perf_counter()
            rid = engine.add_request(prompt, params)
            ttft = None
            while engine.is_unfinished(rid):
                engine.step()
                if ttft is None:
                    ttft = time.perf_counter() - start
            out = engine.pop_finished(rid)
            if turn:
                ttfts.append(ttft)
                cached.append(out.num_cached_tokens)
            follow_up = engine.tokenizer.encode(FOLLOW_UPS[turn % len(FOLLOW_UPS)])
            prompt = prompt + out.token_ids + follow_up
    return statistics.mean(ttfts), statistics.mean(cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--titans", default="default-titans")
    parser.add_argument("--dense", default="default")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.new_tokens
    models = {"titans": resolve_model_path(args.titans), "dense": resolve_model_path(args.dense)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            path = with_positions(path, max_len, Path(tmp))
            # Blocks for every sequence at the largest context, and no prefix caching: each
            # context is computed from scratch.
            num_blocks = args.batch * (-(-max_len // 16) + 1)
            engine = make_engine(
                path, args, max_len, num_blocks=num_blocks, enable_prefix_caching=False
            )
            decode_at_context(engine, contexts[0], args)  # warm-up, not reported
            for context in contexts:
                result = decode_at_context(engine, context, args)
                rows.append({"model": name, "context": context, **result})
                print(f"{name} context {context}: {result}", flush=True)
    by_key = {(r["model"], r["context"]): r for r in rows}
    table = []
    for context in contexts:
        t, d = by_key[("titans", context)], by_key[("dense", context)]
        table.append(
            {
                "context": context,
                "titans_tok_s": t["decode_tok_s"],
                "dense_tok_s": d["decode_tok_s"],
                "speed_ratio": t["decode_tok_s"] / d["decode_tok_s"],
                "titans_MiB_per_seq": t["bytes_per_seq"] / 2**20,
                "dense_MiB_per_seq": d["bytes_per_seq"] / 2**20,
                "bytes_ratio": t["bytes_per_seq"] / d["bytes_per_seq"],
            }
        )
    print(f"\ndecode at context length (batch {args.batch}, {args.new_tokens} new tokens)")
    print_table(table, list(table[0]))
    write_table(table, "titans_context")

    turns = []
    for name, path in models.items():
        for caching in (True, False):
            engine = make_engine(path, args, 2048, enable_prefix_caching=caching)
            decode_at_context(engine, args.turn_context, args)  # warm-up, not reported
            ttft, cached = multi_turn_ttft(engine, args)
            turns.append(
                {"model": name, "prefix_caching": caching, "ttft_s": ttft, "cached_tokens": cached}
            )
    for row in turns:
        off = next(
            r["ttft_s"] for r in turns if r["model"] == row["model"] and not r["prefix_caching"]
        )
        row["ttft_vs_off"] = row["ttft_s"] / off
    print(f"\nmulti-turn TTFT, turns 2..{args.turns} ({args.sessions} sessions)")
    print_table(turns, list(turns[0]))
    write_table(turns, "titans_multi_turn")


if __name__ == "__main__":
    main()
