"""Latency of one MoE layer: experts in-process vs across 2 and 4 ExpertShard actors reached by
ordinary actor calls or by a Ray Compiled Graph, all in the same run.

    python -m benchmarks.moe_dispatch [--tokens 1 16 256] [--shards 2 4] [--repeats 20] [--rounds 5]
        [--threads 1]

A random Mixtral layer (hidden 512, 8 experts of intermediate 1,408, top-2), saved as a Hugging
Face checkpoint so the shards load their experts the way they do in serving. Each row: the median
over ``rounds`` of the median latency of ``MoEFeedForward.forward`` over ``repeats`` calls
(``best_ms``: the lowest round, nearest to an unloaded machine), its ratio to in-process and to
ordinary calls, and ``overhead_ms`` above in-process; at 1 token that overhead is the fixed
per-call cost of a layer. ``idle_cores``: CPU the shard actors burn per
second while no step runs (a compiled graph's actors busy-wait on their channels).

The variants take turns within each round, so load from other work on the machine hits them
alike; a compiled graph lives only while its own rows are timed (it is released, and compiled
again next round), because its spinning actors would slow every other variant on a small machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import ray
import torch

from benchmarks.common import median_seconds, print_table, write_table
from raycake.actors.expert_shard import (
    ExpertShards,
    attach_expert_shards,
    choose_transport,
    create_expert_shards,
)
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


def idle_cores(shards: ExpertShards, seconds: float = 1.0) -> float:
    """CPU seconds per second that the shard actors use while nothing is sent to them."""

    def cpu() -> float:
        return sum(
            ray.get([h.__ray_call__.remote(lambda _: time.process_time()) for h, _ in shards])
        )

    before = cpu()
    time.sleep(seconds)
    return (cpu() - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process; Ray gives each shard actor one (OMP_NUM_THREADS=1)",
    )
    args = parser.parse_args()
    # One thread like each shard, so in-process runs the same kernels; also, on a small shared
    # machine OpenMP threads spin-waiting for a busy core make in-process times erratic.
    torch.set_num_threads(args.threads)

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    path = tempfile.mkdtemp(prefix="moe-bench-")
    build_checkpoint(path)
    # (experts, transport) -> the MoE layer, the same weights behind each way of running them.
    layers = {("in-process", "-"): load_model(path).model.layers[0].mlp}
    compiled: dict[int, ExpertShards] = {}
    for n in args.shards:
        compiled[n] = create_expert_shards(path, EXPERTS, n, transport="compiled")
        # The same actors reached by ordinary calls (closing ``compiled[n]`` kills them).
        calls = ExpertShards(list(compiled[n]), transport="calls")
        for shards in (calls, compiled[n]):
            model = load_model(path)
            attach_expert_shards(model, shards)
            layers[f"{n} shards", shards.transport] = model.model.layers[0].mlp

    def time_ms(key: tuple[str, str], x: torch.Tensor) -> float:
        return 1000 * median_seconds(lambda: layers[key](x), args.repeats)

    samples: dict[tuple[int, str, str], list[float]] = defaultdict(list)
    idle: dict[tuple[str, str], list[float]] = defaultdict(list)
    with torch.inference_mode():
        inputs = {tokens: torch.randn(tokens, HIDDEN) for tokens in args.tokens}
        for _ in range(args.rounds):
            for tokens, x in inputs.items():
                for key in layers:
                    if key[1] != "compiled":
                        samples[(tokens, *key)].append(time_ms(key, x))
            for n, shards in compiled.items():
                key = (f"{n} shards", "compiled")
                idle[f"{n} shards", "calls"].append(idle_cores(shards))
                for _ in range(10):  # compile again, then let the new graph settle
                    layers[key](inputs[args.tokens[0]])
                for tokens, x in inputs.items():
                    samples[(tokens, *key)].append(time_ms(key, x))
                idle[key].append(idle_cores(shards))
                shards.release_graph()

    rows = []
    for tokens in args.tokens:
        base = statistics.median(samples[tokens, "in-process", "-"])
        for experts, transport in layers:
            ms = statistics.median(samples[tokens, experts, transport])
            best = min(samples[tokens, experts, transport])
            calls_ms = statistics.median(samples.get((tokens, experts, "calls"), [ms]))
            rows.append(
                {
                    "tokens": tokens,
                    "experts": experts,
                    "transport": transport,
                    "ms": ms,
                    "best_ms": best,
                    "tokens_per_s": 1000 * tokens / ms,
                    "vs_in_process": ms / base,
                    "vs_calls": ms / calls_ms,
                    "overhead_ms": ms - base,
                    "best_overhead_ms": best - min(samples[tokens, "in-process", "-"]),
                    "idle_cores": statistics.median(idle.get((experts, transport), [0.0])),
                }
            )
    columns = ["tokens", "experts", "transport", "ms", "best_ms", "tokens_per_s", "vs_in_process"]
    print_table(rows, [*columns, "vs_calls", "overhead_ms", "best_overhead_ms", "idle_cores"])
    if 1 in args.tokens:
        print("fixed per-call cost per layer at 1 token (ms above in-process, median / best):")
        for row in rows:
            if row["tokens"] == 1 and row["transport"] != "-":
                print(
                    f"  {row['experts']:>9} {row['transport']:>8}: "
                    f"{row['overhead_ms']:.3f} / {row['best_overhead_ms']:.3f}"
                )
    driver_node = ray.get_runtime_context().get_node_id()
    for n, shards in compiled.items():
        stats = shards.stats
        shard_nodes = ray.get([handle.node_cores.remote() for handle, _ in shards])
        auto = choose_transport(shard_nodes, driver_node, torch.get_num_threads())
        print(
            f"{n} shards: {stats.compiles} compiles, {stats.compile_seconds / stats.compiles:.2f} s "
            f"each; {stats.recoveries} recoveries; transport='auto' picks {auto!r} here"
        )
        shards.close()
    print(f"saved {write_table(rows, 'moe_dispatch')}")


if __name__ == "__main__":
    main()
