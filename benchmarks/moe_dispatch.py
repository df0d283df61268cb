"""Latency of one MoE layer: experts in-process vs across 2 and 4 ExpertShard actors, same run.

    python -m benchmarks.moe_dispatch [--tokens 1 16 256] [--repeats 20]

A random Mixtral layer (hidden 512, 8 experts of intermediate 1,408, top-2), saved as a Hugging
Face checkpoint so the shards load their experts the way they do in serving. Each row: median
latency of ``MoEFeedForward.forward`` over ``repeats`` calls and the ratio to in-process.
"""

from __future__ import annotations

import argparse
import tempfile

import ray
import torch

from benchmarks.common import median_seconds, print_table, write_table
from raycake.actors.expert_shard import attach_expert_shards, create_expert_shards
from raycake.model.loader import load_model

HIDDEN, INTERMEDIATE, EXPERTS = 512, 1408, 8


def build_checkpoint(path: str) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from raycake.training.bpe import save_tokenizer, train_bpe

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    MixtralForCausalLM(config).save_pretrained(path)
    save_tokenizer(train_bpe(["def f(x):\n    return x\n"], 512), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    path = tempfile.mkdtemp(prefix="moe-bench-")
    build_checkpoint(path)
    local_layer = load_model(path).model.layers[0].mlp
    sharded_layers = {}
    for n in args.shards:
        model = load_model(path)
        attach_expert_shards(model, create_expert_shards(path, EXPERTS, n))
        sharded_layers[n] = model.model.layers[0].mlp

    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            x = torch.randn(tokens, HIDDEN)
            base = 1000 * median_seconds(lambda x=x: local_layer(x), args.repeats)
            rows.append(
                {"tokens": tokens, "experts": "in-process", "ms": base, "vs_in_process": 1.0}
            )
            for n, layer in sharded_layers.items():
                ms = 1000 * median_seconds(lambda x=x, layer=layer: layer(x), args.repeats)
                rows.append(
                    {
                        "tokens": tokens,
                        "experts": f"{n} shards",
                        "ms": ms,
                        "vs_in_process": ms / base,
                    }
                )
    for row in rows:
        row["tokens_per_s"] = 1000 * row["tokens"] / row["ms"]
    print_table(rows, ["tokens", "experts", "ms", "tokens_per_s", "vs_in_process"])
    print(f"saved {write_table(rows, 'moe_dispatch')}")


if __name__ == "__main__":
    main()
