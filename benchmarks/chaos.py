"""Chaos: concurrent streaming requests on the demo workload while actors are killed.

    python -m benchmarks.chaos [--sessions 8] [--duration 60] [--kill-every 5]

The local cluster of ``raycake demo`` (1 prefill, 1 decode, 2 KV-store shards, the conductor; the
embedded model) serves ``--sessions`` concurrent sessions of multi-turn conversations (``--turns``
each, then a new one) for ``--duration`` seconds, twice in one run: first with no fault, then
while a random actor (prefill, decode, a store shard or the conductor) is killed every
``--kill-every`` seconds (Ray restarts it). Every request streams; the driver records what
each caller saw. Reported per phase: requests completed, errored (by cause), lost (no final
answer within the bound: must be 0), duplicated or spliced streams (an update that does not
extend what the caller already saw: must be 0), seeded requests whose tokens differ from the
fault-free run, and p50/p99 TTFT. ``--unseeded-share`` of the sessions sample without a seed, so
a decode failure after their first tokens cannot be replayed: they end with a clear error.
Bounded in time: no request starts after ``--duration``, and each has ``--request-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import ray

from benchmarks.common import positive_float, print_table, write_table
from raycake.cluster.cluster import Cluster, ClusterOutput
from raycake.cluster.config import ClusterConfig
from raycake.cluster.workload import FOLLOW_UPS, OPENERS
from raycake.engine.sampling_params import SamplingParams


@dataclass
class RequestRecord:
    phase: str
    session: int
    conversation: int
    turn: int
    seeded: bool
    started_s: float = 0.0  # since the phase began
    finish_reason: str = "lost"
    cause: str = ""
    ttft_ms: float | None = None
    num_tokens: int = 0
    attempts: int = 0
    spliced: bool = False  # some update did not extend what the caller had already seen
    token_ids: list[int] = field(default_factory=list)


async def _stream(cluster: Cluster, prompt: str, params: SamplingParams, record: RequestRecord):
    seen: list[int] = []
    final: ClusterOutput | None = None
    async for update in cluster.astream(prompt, params):
        if update.token_ids[: len(seen)] != seen:
            record.spliced = True
        seen = list(update.token_ids)
        final = update
    assert final is not None
    record.finish_reason = final.finish_reason or "none"
    record.cause = (final.error or "")[:80]
    record.ttft_ms = None if final.ttft_s is None else 1000 * final.ttft_s
    record.num_tokens = len(final.token_ids)
    record.attempts = final.attempts
    record.token_ids = list(final.token_ids)
    return final.text


async def _session(
    cluster: Cluster,
    phase: str,
    session: int,
    args: argparse.Namespace,
    records: list[RequestRecord],
    deadline: float,
) -> None:
    rng = random.Random(args.seed * 1000 + session)
    seeded = session >= round(args.unseeded_share * args.sessions)
    for conversation in itertools.count():
        prompt = OPENERS[(session + conversation) % len(OPENERS)]
        for turn in range(args.turns):
            if time.monotonic() > deadline:
                return
            params = SamplingParams(
                temperature=0.7,
                top_p=0.95,
                seed=(args.seed * 100 + session) if seeded else None,
                max_tokens=args.max_tokens,
            )
            record = RequestRecord(
                phase, session, conversation, turn, seeded, time.monotonic() - args.phase_start
            )
            records.append(record)
            try:
                text = await asyncio.wait_for(
                    _stream(cluster, prompt, params, record), timeout=args.request_timeout
                )
            except Exception as exc:  # a lost request: no final answer (must not happen)
                record.finish_reason, record.cause = "lost", f"{type(exc).__name__}: {exc}"[:80]
                break
            if record.finish_reason not in ("stop", "length"):
                break  # the conversation cannot go on from an answer it did not get
            prompt = prompt + text + rng.choice(FOLLOW_UPS)


async def _killer(
    cluster: Cluster, every_s: float, rng: random.Random, kills: Counter, log: list, start: float
) -> None:
    victims = {
        **{name: actor for name, actor in cluster.prefill.items()},
        **{name: actor for name, actor in cluster.decode.items()},
        **{f"store-{i}": actor for i, actor in enumerate(cluster.store_shards)},
        "conductor": cluster.conductor,
    }
    while True:
        await asyncio.sleep(every_s)
        name = rng.choice(sorted(victims))
        ray.kill(victims[name], no_restart=False)
        kills[name] += 1
        log.append({"phase_s": time.monotonic() - start, "victim": name})


async def _phase(cluster: Cluster, phase: str, args: argparse.Namespace) -> tuple[list, Counter]:
    records: list[RequestRecord] = []
    kills: Counter = Counter()
    args.phase_start = time.monotonic()
    deadline = args.phase_start + args.duration
    killer = None
    if phase == "faults":
        killer = asyncio.ensure_future(
            _killer(
                cluster,
                args.kill_every,
                random.Random(args.seed),
                kills,
                args.kill_log,
                args.phase_start,
            )
        )
    sessions = [_session(cluster, phase, s, args, records, deadline) for s in range(args.sessions)]
    await asyncio.gather(*sessions)
    if killer is not None:
        killer.cancel()
    return records, kills


def _key(record: RequestRecord) -> tuple[int, int, int]:
    return record.session, record.conversation, record.turn


def _percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(phase: str, records: list[RequestRecord], kills: Counter, reference: dict) -> dict:
    ok = [r for r in records if r.finish_reason in ("stop", "length")]
    errored = [r for r in records if r.finish_reason == "error"]
    causes = Counter(r.cause.split(":")[0] for r in errored)
    differs = sum(
        1 for r in ok if r.seeded and _key(r) in reference and reference[_key(r)] != r.token_ids
    )
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    return {
        "phase": phase,
        "requests": len(records),
        "completed": len(ok),
        "errored": len(errored),
        "error_causes": "; ".join(f"{c} x{n}" for c, n in causes.most_common()) or "-",
        "rejected": sum(r.finish_reason == "rejected" for r in records),
        "lost": sum(r.finish_reason == "lost" for r in records),
        "spliced_streams": sum(r.spliced for r in records),
        "seeded_differ_from_fault_free": differs,
        "retried": sum(r.attempts > 1 for r in records),
        "ttft_p50_ms": _percentile(ttft, 50),
        "ttft_p99_ms": _percentile(ttft, 99),
        "kills": ", ".join(f"{k} x{v}" for k, v in sorted(kills.items())) or "-",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions")
    parser.add_argument("--turns", type=int, default=4, help="requests per conversation")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration", type=positive_float, default=60.0, help="s per phase")
    parser.add_argument("--kill-every", type=positive_float, default=5.0, help="seconds")
    parser.add_argument("--request-timeout", type=positive_float, default=180.0)
    parser.add_argument("--unseeded-share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.turns < 1 or not 0 <= args.unseeded_share <= 1:
        parser.error("--sessions and --turns must be >= 1, --unseeded-share in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.kill_log = []
    cluster = Cluster.from_config(
        ClusterConfig(
            namespace="raycake-chaos",
            num_prefill=1,
            num_decode=1,
            num_store_shards=2,
            actor_max_restarts=1000,
            request_max_retries=3,
        )
    )
    try:
        clean, _ = asyncio.run(_phase(cluster, "no_faults", args))
        reference = {_key(r): r.token_ids for r in clean if r.seeded}
        faulty, kills = asyncio.run(_phase(cluster, "faults", args))
    finally:
        cluster.shutdown()
    rows = [
        summarize("no_faults", clean, Counter(), reference),
        summarize("faults", faulty, kills, reference),
    ]
    print_table(
        rows,
        [
            "phase",
            "requests",
            "completed",
            "errored",
            "lost",
            "spliced_streams",
            "seeded_differ_from_fault_free",
            "retried",
            "ttft_p50_ms",
            "ttft_p99_ms",
        ],
    )
    for row in rows:
        print(f"{row['phase']}: errors {row['error_causes']}; kills {row['kills']}")
    write_table(rows, "chaos")
    write_table([vars(r) | {"token_ids": None} for r in clean + faulty], "chaos_requests")
    if args.kill_log:
        write_table(args.kill_log, "chaos_kills")
    return rows


if __name__ == "__main__":
    main()
