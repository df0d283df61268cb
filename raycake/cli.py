"""The ``raycake`` command line: generate | train."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields


def _generate(args: argparse.Namespace) -> int:
    from raycake import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed)
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
    )
    started = time.perf_counter()
    first = None
    num_tokens = 0
    sys.stdout.write(args.prompt)
    for delta in llm.stream(args.prompt, params):
        if first is None:
            first = time.perf_counter() - started
        num_tokens += len(delta.token_ids)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        if delta.finished:
            reason = delta.finish_reason
    elapsed = time.perf_counter() - started
    print(
        f"\n\n[{num_tokens} tokens, finish={reason}, ttft={1000 * (first or 0):.1f} ms, "
        f"{num_tokens / elapsed:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from raycake.config import TrainConfig
    from raycake.training.trainer import train

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    report = train(TrainConfig(**overrides))
    print(
        f"parameters {report.num_parameters:,}; held-out loss {report.held_out_loss:.3f} "
        f"(perplexity {report.held_out_perplexity:.1f}) vs unigram {report.unigram_loss:.3f} "
        f"(perplexity {report.unigram_perplexity:.1f}); {report.seconds:.0f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycake", description="Ray-native LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt with one local engine, streaming")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="default", help="checkpoint folder or 'default'")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=96)
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=_generate)

    tr = sub.add_parser("train", help="train the embedded default model on the stdlib corpus")
    tr.add_argument("--out-dir", dest="out_dir", required=True)
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "warmup_steps",
        "eval_every",
        "eval_batches",
        "max_corpus_files",
        "seed",
    ):
        tr.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    tr.add_argument("--learning-rate", dest="learning_rate", type=float)
    tr.add_argument("--save-dtype", dest="save_dtype", choices=["float32", "bfloat16", "float16"])
    tr.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"raycake {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
