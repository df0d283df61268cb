"""What the OpenAI-compatible HTTP API costs over the Python API, on the same cluster and workload.

    python -m benchmarks.http_serving [--clients 1,8,32] [--turns 3] [--max-tokens 32]

One local cluster (the embedded model, 1 prefill, 1 decode, 1 KV-store shard, the conductor)
and the Ray Serve app over it on a free loopback port. For each count C of concurrent clients,
the same multi-turn workload runs twice: C sessions through ``Cluster.astream`` in this process
(the Python API), then C sessions streaming through HTTP (``--client raw``: aiohttp reading the
SSE lines, light on the CPU the client shares with the server here; ``--client openai``:
``openai.AsyncOpenAI``), ``--repeats`` times, alternating. Each
session has ``--turns`` turns: an opener of ``raycake.cluster.workload``, then the previous
prompt + answer + a follow-up line, so turns reuse their prefixes. Every request samples with
its session's seed, ignores EOS and generates exactly ``--max-tokens`` tokens, so both paths do
the same work; each run's prompts start with a line of their own, so no run finds another's
prefixes in the caches.

Both paths are timed the same way, by the caller: TTFT is the time to the first text, TBT the
gaps between text arrivals; requests/s and tokens/s are over the run's wall time. Bounded:
no turn starts after ``--max-seconds`` into a run. Prints one row per (path, C, repeat) and the
HTTP/Python ratios of the medians over repeats of p50 TTFT, p50 TBT and throughput; writes
``benchmarks/results/http_serving_<client>_<serve mode>.*``. ``--serve-throughput-optimized``
runs Serve in Ray's documented throughput profile (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: the
replica serves HTTP itself, without the proxy actor's hop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import ray

from benchmarks.common import positive_float, print_table, write_table
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from raycake.cluster.workload import FOLLOW_UPS, OPENERS
from raycake.engine.sampling_params import SamplingParams

TEMPERATURE, TOP_P = 0.7, 0.95


@dataclass
class Timed:
    """One request as its caller saw it."""

    text: str = ""
    num_tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when the latest text arrived

    def add_text(self, text: str) -> None:
        """Text arrived now: the first piece sets TTFT, each later one adds a gap."""
        now = time.perf_counter()
        if self.last is None:
            self.ttft_s = now - self.started
        else:
            self.gaps_s.append(now - self.last)
        self.last = now
        self.text += text


Requester = Callable[[str, int], Awaitable[Timed]]


def _python_requester(cluster: Cluster, max_tokens: int) -> Requester:
    async def request(prompt: str, seed: int) -> Timed:
        params = SamplingParams(
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=seed,
            max_tokens=max_tokens,
            ignore_eos=True,
        )
        timed = Timed()
        async with contextlib.aclosing(cluster.astream(prompt, params)) as stream:
            async for out in stream:
                if len(out.text) > len(timed.text):
                    timed.add_text(out.text[len(timed.text) :])
                timed.num_tokens, timed.finish_reason = len(out.token_ids), out.finish_reason
        return timed

    return request


def _raw_requester(session, url: str, model: str, max_tokens: int) -> Requester:
    """A plain aiohttp client that reads the SSE lines itself: on a machine the client shares
    with the server, it takes less of the CPU the server measured here needs."""

    async def request(prompt: str, seed: int) -> Timed:
        timed = Timed()
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        async with session.post(url, json=body) as reply:
            reply.raise_for_status()
            async for line in reply.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if chunk.get("usage"):
                    timed.num_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["text"]:
                        timed.add_text(choice["text"])
                    timed.finish_reason = choice["finish_reason"] or timed.finish_reason
        return timed

    return request


def _openai_requester(client, model: str, max_tokens: int) -> Requester:
    async def request(prompt: str, seed: int) -> Timed:
        timed = Timed()
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                timed.num_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.text:
                timed.add_text(choice.text)
            timed.finish_reason = choice.finish_reason or timed.finish_reason
        return timed

    return request


async def _run(
    request: Requester, tag: str, clients: int, turns: int, max_seconds: float
) -> tuple[list[Timed], float]:
    """``clients`` concurrent sessions of ``turns`` turns; (requests, wall seconds)."""
    rng = random.Random(0)
    openers = [rng.choice(OPENERS) for _ in range(clients)]
    follow_ups = [[rng.choice(FOLLOW_UPS) for _ in range(turns)] for _ in range(clients)]
    deadline = time.perf_counter() + max_seconds
    done: list[Timed] = []

    async def session(i: int) -> None:
        prompt = f"# {tag} session {i}\n{openers[i]}"
        for turn in range(turns):
            if time.perf_counter() > deadline:
                return
            timed = await request(prompt, 1000 * i + turn)
            done.append(timed)
            prompt = prompt + timed.text + follow_ups[i][turn]

    started = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(clients)))
    return done, time.perf_counter() - started


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _row(path: str, clients: int, done: list[Timed], wall_s: float) -> dict:
    ttft = [1000 * t.ttft_s for t in done if t.ttft_s is not None]
    tbt = [1000 * g for t in done for g in t.gaps_s]
    tokens = sum(t.num_tokens for t in done)
    return {
        "path": path,
        "clients": clients,
        "requests": len(done),
        "finished": sum(t.finish_reason == "length" for t in done),
        "wall_s": wall_s,
        "req_per_s": len(done) / wall_s,
        "tok_per_s": tokens / wall_s,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90),
        "tbt_p50_ms": _pct(tbt, 50),
        "tbt_p90_ms": _pct(tbt, 90),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts")
    parser.add_argument("--turns", type=int, default=3, help="turns per session")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument(
        "--max-seconds", type=positive_float, default=120.0, help="no turn starts after this"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per (path, C)")
    parser.add_argument(
        "--client",
        choices=["raw", "openai"],
        default="raw",
        help="HTTP client: aiohttp reading SSE lines (light), or openai.AsyncOpenAI",
    )
    parser.add_argument(
        "--serve-throughput-optimized",
        action="store_true",
        help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the local Ray cluster: Ray Serve's "
        "throughput profile (direct ingress: replicas serve HTTP themselves, no proxy hop)",
    )
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if min(*args.clients, args.turns, args.max_tokens, args.repeats) < 1:
        parser.error("--clients, --turns, --max-tokens and --repeats must be positive")
    return args


async def _measure(cluster: Cluster, base_url: str, args: argparse.Namespace) -> list[dict]:
    import aiohttp
    import openai

    model = cluster.config.engine.model
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=0)
    )
    http = (
        _openai_requester(client, model, args.max_tokens)
        if args.client == "openai"
        else _raw_requester(session, f"{base_url}/completions", model, args.max_tokens)
    )
    paths = {"python": _python_requester(cluster, args.max_tokens), "http": http}
    mode = "throughput_optimized" if args.serve_throughput_optimized else "default"
    for name, request in paths.items():  # warm both paths (connections, replica, engines)
        await _run(request, f"warmup {name}", 2, 1, args.max_seconds)
    rows = []
    for clients, repeat in itertools.product(args.clients, range(args.repeats)):
        for name, request in paths.items():
            done, wall_s = await _run(
                request, f"{name} {clients} {repeat}", clients, args.turns, args.max_seconds
            )
            rows.append({**_row(name, clients, done, wall_s), "repeat": repeat,
                         "client": args.client, "serve_mode": mode})  # fmt: skip
            print(f"{name:>6} x{clients:<3} {len(done)} requests in {wall_s:.1f} s", flush=True)
    await client.close()
    await session.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from ray import serve

    from raycake.cluster.openai_app import build_openai_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.serve_throughput_optimized:  # read by Serve's processes, which inherit it
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR")
    config = ClusterConfig(
        namespace="raycake-bench-http", num_prefill=1, num_decode=1, num_store_shards=1
    )
    cluster = Cluster(config)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app(config), name="bench-openai", route_prefix="/")
        rows = asyncio.run(_measure(cluster, f"http://127.0.0.1:{port}/v1", args))
    finally:
        serve.shutdown()
        cluster.shutdown()
    print()
    print_table(
        rows,
        ["path", "clients", "repeat", "requests", "finished", "wall_s", "req_per_s", "tok_per_s",
         "ttft_p50_ms", "ttft_p90_ms", "tbt_p50_ms", "tbt_p90_ms"],
    )  # fmt: skip
    print()
    for clients in args.clients:

        def median(path: str, key: str, clients: int = clients) -> float:
            return statistics.median(
                r[key] for r in rows if (r["path"], r["clients"]) == (path, clients)
            )

        ratios = {
            key: median("http", key) / median("python", key)
            for key in ("ttft_p50_ms", "tbt_p50_ms", "req_per_s")
        }
        print(
            f"{clients:>3} clients: HTTP/Python p50 TTFT {ratios['ttft_p50_ms']:.2f}, "
            f"p50 TBT {ratios['tbt_p50_ms']:.2f}, throughput {ratios['req_per_s']:.2f}"
        )
    mode = "throughput_optimized" if args.serve_throughput_optimized else "default"
    print(f"\nwrote {write_table(rows, f'http_serving_{args.client}_{mode}')}")


if __name__ == "__main__":
    main()
