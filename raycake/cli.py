"""The ``raycake`` command line: demo | serve | generate | bench | train | train-eagle | simulate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING

from raycake.engine.config import QUANTIZATIONS
from raycake.engine.spec.config import SPECULATIVE_METHODS, SpeculativeConfig
from raycake.model.config import MOE_ROUTERS, SUPPORTED_DTYPES
from raycake.policies.speculation import SPECULATION_POLICIES
from raycake.training.config import EagleTrainConfig, TrainConfig

if TYPE_CHECKING:  # the command line imports Ray and the cluster only for the commands using them
    from raycake.cluster.cluster import Cluster
    from raycake.cluster.config import ClusterConfig, HttpConfig

# The API key's environment variable: read by the command line only, then passed in HttpConfig.
API_KEY_ENV = "RAYCAKE_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raycake.bench import BenchConfig, run_bench
    from raycake.model.config import MoEConfig

    config = BenchConfig(
        model=args.model,
        dtype=args.dtype,
        seed=args.seed,
        dataset=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        moe=MoEConfig(
            router=args.moe_router,
            capacity_factor=args.capacity_factor,
            num_expert_shards=args.num_expert_shards,
        ),
        quantization=args.quantization,
        temperature=args.temperature,
        speculative=None
        if args.speculative is None
        else SpeculativeConfig(
            method=args.speculative,
            draft_model=args.draft_model,
            num_draft_tokens=args.num_draft_tokens,
            tree_top_k=args.tree_top_k,
            max_depth=args.max_depth,
            policy=args.spec_policy,
        ),
        compare_plain=args.compare_plain,
        compile_decode=args.compile_decode,
    )
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():  # fail before the run, not after
        raise FileNotFoundError(f"--output: folder {output.parent} does not exist")
    report = run_bench(config, progress=not args.json and sys.stderr.isatty())
    if output is not None:
        output.write_text(report.to_json() + "\n")
    print(report.to_json() if args.json else report.format_text())
    return 0


def _train(args: argparse.Namespace) -> int:
    from raycake.training.trainer import train

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    report = train(TrainConfig(**overrides))
    recall = (
        ""
        if report.recall_accuracy is None
        else f"; recall {report.recall_accuracy:.1%} at distance {report.recall_distance}"
    )
    print(
        f"parameters {report.num_parameters:,}; held-out loss {report.held_out_loss:.3f} "
        f"(perplexity {report.held_out_perplexity:.1f}) vs unigram {report.unigram_loss:.3f} "
        f"(perplexity {report.unigram_perplexity:.1f}){recall}; {report.seconds:.0f} s"
    )
    return 0


def _int_tuple(text: str) -> tuple[int, ...]:
    """argparse type for a tuple field: comma-separated integers ("1,3"; "": empty)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _train_eagle(args: argparse.Namespace) -> int:
    from raycake.training.eagle_trainer import accuracy_line, train_eagle

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(EagleTrainConfig)
        if getattr(args, f.name, None) is not None
    }
    print(accuracy_line(train_eagle(EagleTrainConfig(**overrides))))
    return 0


def _start_cluster(
    config_path: str | None, model: str | None = None, num_expert_shards: int | None = None
):
    """The cluster of ``config_path`` (or the default one), with the demo's overrides applied."""
    from dataclasses import replace

    from raycake.cluster.cluster import Cluster
    from raycake.cluster.config import ClusterConfig

    config = ClusterConfig.from_file(config_path) if config_path else ClusterConfig()
    engine = config.engine
    if model is not None:
        engine = replace(engine, model=model)
    if num_expert_shards is not None:
        engine = replace(engine, moe=replace(engine.moe, num_expert_shards=num_expert_shards))
    return Cluster(replace(config, engine=engine))


def _demo(args: argparse.Namespace) -> int:
    from raycake.cluster.workload import run_multi_turn

    cluster = _start_cluster(args.config, args.model, args.num_expert_shards)
    outputs, summary = run_multi_turn(
        cluster, num_sessions=args.sessions, num_turns=args.turns, max_tokens=args.max_tokens
    )
    print(f"\nfirst answer: {outputs[0].text[:200]!r}")
    print(
        f"requests {summary.num_requests} (rejected {summary.num_rejected}, errors {summary.num_errors})"
    )
    print(
        f"TTFT ms  p50 {summary.ttft_p50_ms:8.1f}  p90 {summary.ttft_p90_ms:8.1f}  "
        f"p99 {summary.ttft_p99_ms:8.1f}"
    )
    print(
        f"TBT ms   p50 {summary.tbt_p50_ms:8.1f}  p90 {summary.tbt_p90_ms:8.1f}  "
        f"p99 {summary.tbt_p99_ms:8.1f}"
    )
    print(
        f"prefix cache hit rate {summary.cache_hit_rate:.1%} "
        f"({summary.cached_tokens}/{summary.prompt_tokens} prompt tokens; "
        f"{summary.store_blocks} blocks from the KV store)"
    )
    print(f"KV bytes moved prefill -> decode {summary.kv_bytes:,}")
    cluster.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP API on Ray Serve; with ``--stdin``, JSON lines instead."""
    return _serve_stdin(args) if args.stdin else _serve_http(args)


def _serve_stdin(args: argparse.Namespace) -> int:
    """JSON lines in, one JSON reply line per request out (``raycake.cluster.jsonl_server``)."""
    import json

    from raycake.cluster.jsonl_server import serve_stdin

    cluster = _start_cluster(args.config)
    print(
        json.dumps(
            {"event": "ready", "prefill": list(cluster.prefill), "decode": list(cluster.decode)}
        ),
        flush=True,
    )
    try:
        serve_stdin(cluster)
    finally:
        cluster.shutdown()
    return 0


def http_config_from_args(
    http: HttpConfig, args: argparse.Namespace, environ: Mapping[str, str]
) -> HttpConfig:
    """The config's ``http`` section with the command line's overrides; the API key comes from
    ``--api-key`` or else ``RAYCAKE_API_KEY`` (read here, once, and passed down)."""
    from dataclasses import replace

    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    api_key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV)
    if api_key is not None:
        overrides["api_key"] = api_key
    return replace(http, **overrides)


def _attach_or_launch(config: ClusterConfig) -> Cluster:
    """A driver over the deployment's actors when they already run, else a fresh deployment."""
    from raycake.cluster.cluster import Cluster

    try:
        return Cluster.attach(config)
    except ValueError:  # ray.get_actor: no actor of that name in the namespace
        return Cluster(config)


def _serve_http(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading
    from dataclasses import replace

    from ray import serve

    from raycake.cluster.config import ClusterConfig
    from raycake.cluster.openai_app import APP_NAME, serve_http

    config = ClusterConfig.from_file(args.config) if args.config else ClusterConfig()
    config = replace(config, http=http_config_from_args(config.http, args, os.environ))
    if config.http.api_key is None and config.http.host not in LOOPBACK_HOSTS:
        print(
            f"raycake serve: warning: listening on {config.http.host} without an API key "
            f"(--api-key or {API_KEY_ENV})",
            file=sys.stderr,
        )
    cluster = _attach_or_launch(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # ray job stop sends SIGTERM
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = serve_http(config)
        ready = {
            "event": "ready",
            "url": url,
            "model": config.http.served_model_name or config.engine.model,
            "attached": not cluster.owns_actors,
            "prefill": list(cluster.prefill),
            "decode": list(cluster.decode),
        }
        print(json.dumps(ready), flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if not serve.status().applications:  # nothing else is served: free the port too
            serve.shutdown()
        cluster.shutdown()  # kills the actors only if this command launched them
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycake", description="Ray-native LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="disaggregated cluster on local Ray: multi-turn workload, latency report"
    )
    demo.add_argument("--config", help="cluster YAML/JSON (default: 1 prefill, 1 decode, 2 shards)")
    demo.add_argument(
        "--model",
        help="overrides the config's engine.model: a checkpoint folder, 'default', "
        "'default-moe' (the embedded Switch-MoE model) or 'default-titans' (Titans MAG)",
    )
    demo.add_argument(
        "--num-expert-shards",
        type=int,
        help="MoE models: run each instance's experts in this many ExpertShard actors",
    )
    demo.add_argument("--sessions", type=int, default=6)
    demo.add_argument("--turns", type=int, default=3)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=_demo)

    serve = sub.add_parser(
        "serve",
        help="bring the cluster up (or attach to its running actors) and serve the "
        "OpenAI-compatible HTTP API through Ray Serve until interrupted",
    )
    serve.add_argument("--config", help="cluster YAML/JSON (its http: section sizes the server)")
    serve.add_argument("--host", help="address to listen on (default: http.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: http.port, 8000)")
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer <key>' on /v1 routes (default: ${API_KEY_ENV}, "
        "else no key)",
    )
    serve.add_argument(
        "--stdin",
        action="store_true",
        help="instead of HTTP: JSON-lines requests on stdin, one reply line each on stdout",
    )
    serve.set_defaults(func=_serve)

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

    bench = sub.add_parser(
        "bench", help="offline workload through one local engine: throughput, latency, MoE load"
    )
    bench.add_argument(
        "--model",
        default="default",
        help="checkpoint folder, 'default', 'default-moe' or 'default-titans'",
    )
    bench.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES)
    bench.add_argument(
        "--quantization", choices=QUANTIZATIONS, help="int8: LLM.int8() weights (default: none)"
    )
    bench.add_argument("--seed", type=int, default=0, help="prompts, sampling and engine")
    bench.add_argument(
        "--compile-decode",
        action="store_true",
        help="run decode steps through a graph compiled by torch.compile (compiles on warm-up)",
    )
    bench.add_argument(
        "--dataset",
        default="random",
        choices=["random", "corpus"],
        help="random token ids, or held-out stdlib source",
    )
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    bench.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    bench.add_argument("--max-num-seqs", type=int, default=64)
    bench.add_argument("--max-num-batched-tokens", type=int, default=2048)
    bench.add_argument(
        "--moe-router", choices=MOE_ROUTERS, help="MoE routing policy (default: the model's)"
    )
    bench.add_argument(
        "--capacity-factor", type=float, help="switch router expert capacity (default: dropless)"
    )
    bench.add_argument(
        "--num-expert-shards", type=int, default=0, help="run experts in N Ray actors"
    )
    bench.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)"
    )
    spec_defaults = SpeculativeConfig(draft_model="default")
    bench.add_argument(
        "--speculative", choices=SPECULATIVE_METHODS, help="speculative decoding (default: off)"
    )
    bench.add_argument(
        "--draft-model",
        default="default",
        help="EAGLE head folder ('default': the embedded model's head)",
    )
    bench.add_argument(
        "--num-draft-tokens",
        type=int,
        default=spec_defaults.num_draft_tokens,
        help="draft tree nodes per request per step (the adaptive policy's maximum)",
    )
    bench.add_argument("--tree-top-k", type=int, default=spec_defaults.tree_top_k)
    bench.add_argument("--max-depth", type=int, default=spec_defaults.max_depth)
    bench.add_argument("--spec-policy", choices=SPECULATION_POLICIES, default=spec_defaults.policy)
    bench.add_argument(
        "--compare-plain",
        action="store_true",
        help="also run the workload without speculation and report the measured speedup",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--output", help="also write the JSON report to this file")
    bench.set_defaults(func=_bench)

    tr = sub.add_parser(
        "train", help="train an embedded model (Llama, Switch-MoE, Titans MAG) on the stdlib corpus"
    )
    tr.add_argument("--out-dir", dest="out_dir", required=True)
    # One flag per TrainConfig field, typed from the field: the config is the only list.
    types = {
        "int": int,
        "int | None": int,
        "float": float,
        "str": str,
        "str | None": str,
        "tuple[int, ...]": _int_tuple,
    }
    for f in fields(TrainConfig):
        if f.name != "out_dir":
            tr.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=types[f.type])
    tr.set_defaults(func=_train)

    te = sub.add_parser(
        "train-eagle", help="train an EAGLE draft head for a served model (default: embedded)"
    )
    te.add_argument("--out-dir", dest="out_dir", required=True)
    for f in fields(EagleTrainConfig):
        if f.name != "out_dir":
            te.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=types[f.type])
    te.set_defaults(func=_train_eagle)

    from raycake.sim.cli import add_simulate_parser

    add_simulate_parser(sub)
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
