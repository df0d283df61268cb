"""Titans MAG (``default-titans``) against the dense embedded model (``default``): held-out loss
at the same tokens seen, passkey recall beyond the window, and KV + state bytes per sequence.

    python -m benchmarks.titans_quality [--trials 128] [--out benchmarks/results]

(a) Held-out loss: both training runs' history at matching tokens seen (both evaluate the same
    ``eval_batches`` x 16 consecutive 256-token windows of the held-out stdlib files with the
    same tokenizer), then both shipped models on those same windows now, plus Titans with its
    memory disabled.
(b) Recall (``raycake.training.recall``, the S-NIAH flavour): ``passkey = "48213"`` then
    ``distance-windows`` x window tokens of held-out code then ``assert passkey == "``; exact match
    of the greedy digits, over ``--trials`` keys fresh from ``--seed``, for Titans, Titans with the
    memory's retrieved output zeroed, the dense model on the last ``window`` prompt tokens, and the
    dense model on the whole prompt (an upper reference: its attention sees the needle).
(c) Bytes one sequence holds at context n, from the configs: dense KV grows with n; Titans holds
    the window's KV plus its memory state (``memory_state_bytes_per_slot``), flat in n. The
    engine frees KV by whole blocks, so it holds up to ``ceil((window - 1) / block) + 1`` blocks.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from benchmarks.common import RESULTS_DIR, print_table, write_table
from raycake.engine.memory_state import memory_state_bytes_per_slot
from raycake.model.config import ModelConfig
from raycake.model.loader import DTYPES, load_model, resolve_model_path
from raycake.model.titans_mag import TitansMAGForCausalLM
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.recall import KEY_DIGITS, RecallSample, RecallTask, right_padded
from raycake.training.trainer import encode_corpus, evaluate

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)


@contextmanager
def memory_disabled(model: TitansMAGForCausalLM) -> Iterator[None]:
    """Replace every memory layer's retrieved output by zeros (training path). The gate is then
    sigmoid(norm(0)) = 1/2 everywhere: the attention as the layer computes it with nothing
    retrieved, so whatever the model recalls must come through its window."""

    def nothing_retrieved(x: torch.Tensor, state=None) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(x), state

    memories = list(model.memories().values())
    for memory in memories:
        memory.forward = nothing_retrieved  # an instance attribute shadows the method
    try:
        yield
    finally:
        for memory in memories:
            del memory.forward


@torch.no_grad()
def greedy(model, prompts: list[list[int]], new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations on the training path, prompts right-padded in batches (a causal
    model never reads the padding after a prompt)."""
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids, lengths = right_padded(prompts[i : i + batch_size], pad=0)
        ids = torch.cat([ids, ids.new_zeros(len(ids), new_tokens)], dim=1)
        rows = torch.arange(len(ids))
        for _ in range(new_tokens):
            width = int(lengths.max())
            hidden = model(ids[:, :width], torch.arange(width).expand(len(ids), width))
            ids[rows, lengths] = model.compute_logits(hidden[rows, lengths - 1]).argmax(-1)
            lengths += 1
        start = lengths - new_tokens
        outputs += [ids[r, start[r] : lengths[r]].tolist() for r in rows]
    return outputs


def leading_digits(text: str) -> str:
    digits = ""
    for char in text:
        if not char.isdigit():
            break
        digits += char
    return digits


def recall_row(
    name: str,
    model,
    prompts: list[list[int]],
    samples: list[RecallSample],
    tokenizer: Tokenizer,
    batch_size: int,
) -> dict:
    """Greedy exact match of the key's digits; ``first_token``: the first answer token alone."""
    # KEY_DIGITS + 1 tokens always hold the digits and one more: a longer number is a miss.
    outputs = greedy(model, prompts, KEY_DIGITS + 1, batch_size)
    pairs = list(zip(outputs, samples, strict=True))
    hits = [leading_digits(tokenizer.decode(out)) == s.key for out, s in pairs]
    first = [out[:1] == s.answer[:1] for out, s in pairs]
    accuracy = sum(hits) / len(hits)
    low, high = wilson_interval(sum(hits), len(hits))
    return {
        "model": name,
        "trials": len(hits),
        "context_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
        "exact_match": accuracy,
        "ci95_low": low,
        "ci95_high": high,
        "first_token": sum(first) / len(first),
    }


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0 and 1, unlike p +- 2 se)."""
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, center - half), min(1.0, center + half)


def held_out_tokens(model_dir: Path, train_config: dict) -> np.ndarray:
    """The held-out token stream the trainer evaluated on: same split, same file limit."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    split = split_corpus(held_out_percent=train_config.get("held_out_percent", 2))
    files = split.held_out[: train_config.get("max_corpus_files")]
    return encode_corpus(tokenizer, list(read_texts(files)))


def train_report(model_dir: Path) -> dict:
    return json.loads((model_dir / "train_report.json").read_text())


def history_rows(titans: dict, dense: dict) -> list[dict]:
    """Held-out loss of both runs where their tokens seen match."""

    def by_tokens(report: dict) -> dict[int, float]:
        c = report["config"]
        per_step = c["batch_size"] * c["seq_len"]
        return {
            (h["step"] + 1) * per_step: h["held_out_loss"]
            for h in report["history"]
            if "held_out_loss" in h
        }

    titans_losses, dense_losses = by_tokens(titans), by_tokens(dense)
    per_step = titans["config"]["batch_size"] * titans["config"]["seq_len"]
    return [
        {
            "step": tokens // per_step,
            "tokens_seen": tokens,
            "titans_loss": titans_losses[tokens],
            "dense_loss": dense_losses[tokens],
            "difference": titans_losses[tokens] - dense_losses[tokens],
        }
        for tokens in sorted(set(titans_losses) & set(dense_losses))
    ]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def bytes_rows(
    dense: ModelConfig, titans: TitansMAGForCausalLM, contexts, dtype: torch.dtype, block: int
) -> list[dict]:
    window = titans.config.titans.sliding_window
    state = memory_state_bytes_per_slot(titans.memories(), dtype)
    per_token_dense, per_token_titans = (
        kv_bytes_per_token(c, dtype) for c in (dense, titans.config)
    )
    # Blocks wholly before the window are freed; the window can straddle one more block.
    engine_window = (math.ceil((window - 1) / block) + 1) * block
    rows = []
    for n in contexts:
        titans_bytes = per_token_titans * min(n, window) + state
        rows.append(
            {
                "context_tokens": n,
                "dense_kv_bytes": per_token_dense * n,
                "titans_kv_bytes": per_token_titans * min(n, window),
                "titans_state_bytes": state,
                "titans_total_bytes": titans_bytes,
                "titans_engine_bytes": per_token_titans * min(n, engine_window) + state,
                "dense_over_titans": per_token_dense * n / titans_bytes,
            }
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--titans", default="default-titans", help="Titans MAG checkpoint")
    parser.add_argument("--dense", default="default", help="dense checkpoint, same tokenizer")
    parser.add_argument("--trials", type=int, default=128, help="recall trials (keys)")
    parser.add_argument("--seed", type=int, default=2501, help="recall keys and filler offsets")
    parser.add_argument(
        "--distance-windows", type=int, default=4, help="needle distance in sliding windows"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--contexts",
        default=",".join(str(n) for n in DEFAULT_CONTEXTS),
        help="comma-separated context lengths for the bytes table",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="KV dtype")
    parser.add_argument("--block-size", type=int, default=16, help="engine KV block size")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.distance_windows < 1 or args.batch_size < 1:
        parser.error("--trials, --distance-windows and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    titans_dir, dense_dir = resolve_model_path(args.titans), resolve_model_path(args.dense)
    titans_report, dense_report = train_report(titans_dir), train_report(dense_dir)
    if (titans_dir / "tokenizer.json").read_bytes() != (dense_dir / "tokenizer.json").read_bytes():
        raise SystemExit(f"{titans_dir} and {dense_dir} must share a tokenizer to be compared")
    titans = load_model(titans_dir)
    dense = load_model(dense_dir)
    if not isinstance(titans, TitansMAGForCausalLM):
        raise SystemExit(f"{titans_dir}: not a Titans MAG checkpoint")
    window = titans.config.titans.sliding_window
    config = titans_report["config"]
    held = held_out_tokens(titans_dir, config)
    print(
        f"titans {sum(p.numel() for p in titans.parameters()):,} parameters (window {window}), "
        f"dense {sum(p.numel() for p in dense.parameters()):,}; {len(held):,} held-out tokens"
    )

    print("\n(a) held-out loss (nats/token) during training, at the same tokens seen:")
    history = history_rows(titans_report, dense_report)
    if history:
        print_table(history, ["step", "tokens_seen", "titans_loss", "dense_loss", "difference"])
    else:
        print("(the runs never evaluated at the same number of tokens seen)")
    windows = config["eval_batches"] * 16
    now = [
        {"model": "titans", "loss": evaluate(titans, held, config["seq_len"], windows)},
        {"model": "dense", "loss": evaluate(dense, held, config["seq_len"], windows)},
    ]
    with memory_disabled(titans):
        now.append(
            {
                "model": "titans_no_memory",
                "loss": evaluate(titans, held, config["seq_len"], windows),
            }
        )
    for row, report in zip(now, (titans_report, dense_report, titans_report), strict=True):
        row["tokens_seen"] = report["report"]["tokens_seen"]
    print(f"\nshipped weights now, the same {windows} windows of {config['seq_len']} tokens:")
    print_table(now, ["model", "tokens_seen", "loss"])

    tokenizer = Tokenizer.from_file(str(titans_dir / "tokenizer.json"))
    distance = args.distance_windows * window
    samples = RecallTask(tokenizer).eval_samples(held, args.trials, distance, seed=args.seed)
    prompts = [s.prompt for s in samples]
    print(
        f"\n(b) passkey recall: needle {distance} filler tokens ({args.distance_windows} x window "
        f"{window}) before the query, {args.trials} held-out trials, greedy exact match:"
    )
    batch = args.batch_size
    recall = [recall_row("titans", titans, prompts, samples, tokenizer, batch)]
    with memory_disabled(titans):
        recall.append(recall_row("titans_no_memory", titans, prompts, samples, tokenizer, batch))
    last_window = [p[-window:] for p in prompts]
    recall.append(recall_row("dense_last_window", dense, last_window, samples, tokenizer, batch))
    recall.append(recall_row("dense_full_context", dense, prompts, samples, tokenizer, batch))
    columns = ["model", "trials", "context_tokens", "exact_match", "ci95_low", "ci95_high"]
    print_table(recall, [*columns, "first_token"])

    contexts = [int(n) for n in args.contexts.split(",") if n.strip()]
    print(f"\n(c) bytes per sequence ({args.dtype} KV, float32 memory state):")
    sizes = bytes_rows(dense.config, titans, contexts, DTYPES[args.dtype], args.block_size)
    print_table(
        sizes,
        [
            "context_tokens",
            "dense_kv_bytes",
            "titans_kv_bytes",
            "titans_state_bytes",
            "titans_total_bytes",
            "titans_engine_bytes",
            "dense_over_titans",
        ],
    )
    if history:
        write_table(history, "titans_quality_loss_history", args.out)
    write_table(now, "titans_quality_loss", args.out)
    write_table(recall, "titans_quality_recall", args.out)
    print(f"saved {write_table(sizes, 'titans_quality_bytes', args.out)} (and the other tables)")


if __name__ == "__main__":
    main()
