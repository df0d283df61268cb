"""TTFT of a multi-turn workload with shared prefixes: KV store on vs off, same run.

    python -m benchmarks.prefix_reuse [--sessions 6] [--turns 4] [--context-tokens 768]

Each session starts from a long held-out stdlib file (its "document") and asks follow-ups;
each turn's prompt is the previous prompt + answer + a new line. Two prefill instances, one
decode instance. Configurations, each a fresh cluster on local Ray:

- ``store``: cache-aware conductor, KV store (2 shards) + local prefix caches;
- ``local``: cache-aware conductor, local prefix caches only;
- ``off``: least-loaded conductor, no store and no prefix caching: every token is computed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

from benchmarks.common import print_table, write_table
from raycake.assets import default_model_dir
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from raycake.engine.config import CacheConfig, EngineConfig
from raycake.engine.sampling_params import SamplingParams
from raycake.model.tokenizer import Tokenizer
from raycake.policies.scheduling_config import SchedulingConfig
from raycake.training.corpus import read_texts, split_corpus

FOLLOW_UPS = ["\n\n# Now a test for it:\n", "\n\n# A faster version:\n", "\n\n# Usage example:\n"]


def documents(num: int, context_tokens: int) -> list[list[int]]:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    docs = []
    for text in read_texts(split_corpus().held_out):
        ids = tokenizer.encode(text)
        if len(ids) >= context_tokens:
            docs.append(ids[:context_tokens])
        if len(docs) == num:
            return docs
    raise RuntimeError("not enough long held-out files")


def run(name: str, config: ClusterConfig, docs: list[list[int]], turns: int, new_tokens: int):
    cluster = Cluster.from_config(config)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [list(d) for d in docs]
    rows = []
    try:
        cluster.generate([[1, 2, 3]], params)  # warm the actors
        for turn in range(turns):
            started = time.perf_counter()
            outputs = cluster.generate(prompts, params)
            elapsed = time.perf_counter() - started
            for out in outputs:
                rows.append(
                    {
                        "config": name,
                        "turn": turn,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "cached_tokens": out.num_cached_tokens,
                        "store_blocks": out.num_store_blocks,
                        "ttft_ms": 1000 * out.ttft_s,
                        "turn_seconds": elapsed,
                    }
                )
            follow = [
                cluster.tokenizer.encode(
                    FOLLOW_UPS[turn % len(FOLLOW_UPS)], add_special_tokens=False
                )
            ]
            prompts = [p + o.token_ids + follow[0] for p, o in zip(prompts, outputs, strict=True)]
    finally:
        cluster.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=768)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR")
    docs = documents(args.sessions, args.context_tokens)
    common = dict(num_prefill=2, num_decode=1, instance_num_cpus=0.5)
    configs = {
        "store": ClusterConfig(
            namespace="bench-store",
            num_store_shards=2,
            scheduling=SchedulingConfig(policy="cache_aware", use_store=True),
            **common,
        ),
        "local": ClusterConfig(
            namespace="bench-local",
            num_store_shards=0,
            scheduling=SchedulingConfig(policy="cache_aware", use_store=False),
            **common,
        ),
        "off": ClusterConfig(
            namespace="bench-off",
            num_store_shards=0,
            scheduling=SchedulingConfig(policy="least_loaded", use_store=False),
            engine=EngineConfig(cache=CacheConfig(enable_prefix_caching=False)),
            **common,
        ),
    }
    rows = []
    for name, config in configs.items():
        rows += run(name, config, docs, args.turns, args.new_tokens)

    summary = []
    for name in configs:
        later = [r for r in rows if r["config"] == name and r["turn"] > 0]
        ttft = [r["ttft_ms"] for r in later]
        summary.append(
            {
                "config": name,
                "requests": len(later),
                "cached_share": sum(r["cached_tokens"] for r in later)
                / sum(r["prompt_tokens"] for r in later),
                "store_blocks": sum(r["store_blocks"] for r in later),
                "ttft_p50_ms": statistics.median(ttft),
                "ttft_p90_ms": statistics.quantiles(ttft, n=10)[-1],
            }
        )
    off = next(s for s in summary if s["config"] == "off")["ttft_p50_ms"]
    for s in summary:
        s["p50_speedup_vs_off"] = off / s["ttft_p50_ms"]
    print("turns after the first (the first turn of every session is a cold prefill):")
    print_table(
        summary,
        [
            "config",
            "requests",
            "cached_share",
            "store_blocks",
            "ttft_p50_ms",
            "ttft_p90_ms",
            "p50_speedup_vs_off",
        ],
    )
    write_table(rows, "prefix_reuse_requests")
    print(f"saved {write_table(summary, 'prefix_reuse')}")


if __name__ == "__main__":
    main()
