"""Output tokens/s of raycake vs transformers generate() on the embedded model, same run.

    python benchmarks/engine_throughput.py [--concurrency 1 32] [--repeats 3] [--compile-decode]

Each request: a ~128-token held-out prompt, 128 new tokens, greedy, EOS ignored so both
engines produce the same number of tokens. transformers runs the batch with left padding.
``--compile-decode``: raycake's decode steps through its compiled graph (compiled during the
warm-up run, outside the timings).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from benchmarks.common import (
    held_out_prompts,
    machine_columns,
    median_seconds,
    print_table,
    write_table,
)
from raycake import LLM, SamplingParams
from raycake.assets import default_model_dir


def run_raycake(llm: LLM, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert all(len(o.token_ids) == new_tokens for o in outputs)


def run_transformers(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> None:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):  # left padding, as generate() wants for decoder-only models
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
    assert out.shape[1] == width + new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], help="both engines run each dtype"
    )
    parser.add_argument(
        "--compile-decode", action="store_true", help="raycake with EngineConfig.compile_decode"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    rows = []
    for dtype in args.dtypes:
        llm = LLM(
            "default",
            dtype=dtype,
            max_num_seqs=max(args.concurrency),
            compile_decode=args.compile_decode,
        )
        hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=getattr(torch, dtype))
        hf = hf.eval()
        hf.generation_config.eos_token_id = None  # same token count as raycake's ignore_eos
        pad_id = llm.tokenizer.eos_token_ids[0]
        prompts = held_out_prompts(llm.tokenizer, max(args.concurrency), args.prompt_tokens)
        for n in args.concurrency:
            batch = prompts[:n]
            tokens = n * args.new_tokens
            t_rc = median_seconds(partial(run_raycake, llm, batch, args.new_tokens), args.repeats)
            t_hf = median_seconds(
                partial(run_transformers, hf, batch, args.new_tokens, pad_id), args.repeats
            )
            rows.append(
                {
                    "dtype": dtype,
                    "concurrency": n,
                    "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens,
                    "raycake_tok_s": tokens / t_rc,
                    "transformers_tok_s": tokens / t_hf,
                    "ratio": t_hf / t_rc,
                    "compile_decode": args.compile_decode,
                    **machine_columns(),
                }
            )
    print_table(rows, ["dtype", "concurrency", "raycake_tok_s", "transformers_tok_s", "ratio"])
    print(f"saved {write_table(rows, 'engine_throughput')}")


if __name__ == "__main__":
    main()
