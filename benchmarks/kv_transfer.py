"""GB/s moving KV blocks between two Ray actors with each transfer backend, next to memcpy.

    python -m benchmarks.kv_transfer [--mib 64] [--repeats 5] [--warmup 3]

Each run: the sender packs and publishes a fresh payload (bfloat16, Llama-3-8B-like layout), the
receiving actor fetches it and touches every 4 KiB page, the sender releases it and nobody keeps
the handle (as after a real hand-off). publish_ms is the sender's part, fetch_ms the receiver's
(what a decode instance waits for); end to end is the two together: from a prefill instance
holding the KV to a decode instance holding it, without the actor calls in between. Each is the
median of ``repeats`` runs after ``warmup`` runs; slowest_publish_ms is the slowest of those,
first_publish_ms the very first publish of a fresh sender. The memcpy row is an in-process torch
``copy_`` of the same bytes into a buffer already written once, measured in the same run.

The object store is measured twice: published by the sender (the default) and with an ``owner``
actor that owns the objects so they outlive the sender (no instance uses one today): the owner
puts the payload itself, a second copy (see raycake/transfer/object_store.py).
NOTE: a publish into the object store writes to shared memory, and a process's first write to a
page costs a page fault (here 1.8-3.5 us per 4 KiB page, more than the copy itself). The store
re-uses freed objects' memory, so a process that keeps publishing mostly writes to pages it has
written before: the warm-up runs get there, first_publish_ms is the cost before, and
slowest_publish_ms shows when a publish still lands on new pages.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from typing import NamedTuple

import ray
import torch

from benchmarks.common import median_seconds, print_table, write_table
from raycake.transfer import KVHandle, make_kv_transfer, pack_kv
from raycake.transfer.ray_direct import (
    RAY_DIRECT_ACTOR_OPTIONS,
    RayDirectKVEndpoint,
    connect_ray_direct,
)

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 32, 16, 8, 128  # 128 KiB of bf16 KV per token
PAGE = 4096
OWNED = "object_store (owner: another actor)"  # the row of the object store with an owner


def kv_shape(mib: int) -> tuple[int, ...]:
    block_bytes = NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2  # 2 MiB
    num_blocks = max(1, mib * 2**20 // block_bytes)
    return (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def touch(kv: torch.Tensor) -> int:
    """Read one byte of every page, so lazily mapped memory really arrives."""
    return int(kv.reshape(-1).view(torch.uint8)[::PAGE].sum())


@ray.remote(**RAY_DIRECT_ACTOR_OPTIONS)
class BenchPeer(RayDirectKVEndpoint):
    def __init__(self, backends: list[str], owner: ray.actor.ActorHandle | None = None):
        options = {"ray_direct": {"endpoint": self}, "object_store": {"owner": owner}}
        self.transfers = {
            name: make_kv_transfer(name, **options.get(name, {})) for name in backends
        }

    def publish(self, backend: str, shape: tuple[int, ...]) -> tuple[KVHandle, float]:
        kv = torch.randn(shape).to(torch.bfloat16)
        start = time.perf_counter()
        header, array = pack_kv(kv, [], num_tokens=shape[2] * shape[3])
        handle = self.transfers[backend].publish(header, array)
        return handle, time.perf_counter() - start

    def fetch(self, backend: str, handle: KVHandle) -> float:
        start = time.perf_counter()
        touch(self.transfers[backend].fetch(handle).kv)
        return time.perf_counter() - start

    def release(self, backend: str, handle: KVHandle) -> None:
        self.transfers[backend].release(handle)


class Timings(NamedTuple):
    first_publish_s: float  # the sender's first publish, before any warm-up
    publish_s: float  # median after the warm-up
    slowest_publish_s: float  # the slowest after the warm-up
    fetch_s: float  # median after the warm-up


def measure_backend(sender, receiver, backend: str, shape, warmup: int, repeats: int) -> Timings:
    first_publish_s, publish_s, fetch_s = 0.0, [], []
    for run in range(warmup + repeats):
        handle, published = ray.get(sender.publish.remote(backend, shape))
        fetched = ray.get(receiver.fetch.remote(backend, handle))
        ray.get(sender.release.remote(backend, handle))
        del handle  # the last reference: Ray may free the object and re-use its memory
        if run == 0:
            first_publish_s = published
        if run >= warmup:
            publish_s.append(published)
            fetch_s.append(fetched)
    return Timings(
        first_publish_s, statistics.median(publish_s), max(publish_s), statistics.median(fetch_s)
    )


def measure_memcpy(shape: tuple[int, ...], repeats: int) -> float:
    src = torch.randn(shape).to(torch.bfloat16)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="runs before the measured ones")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    shape = kv_shape(args.mib)
    nbytes = torch.Size(shape).numel() * 2
    memcpy_s = measure_memcpy(shape, args.repeats)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    backends = ["object_store", "ray_direct"]
    if importlib.util.find_spec("mooncake") is not None:
        backends.append("mooncake")
    sender, receiver = BenchPeer.remote(backends), BenchPeer.remote(backends)
    connect_ray_direct([sender, receiver], transport="gloo")
    # A stand-in for a KV store shard: it owns what owned_sender publishes.
    owner = BenchPeer.remote([])
    owned_sender = BenchPeer.remote(["object_store"], owner=owner)

    memcpy_gbps = nbytes / memcpy_s / 1e9
    rows = [
        {
            "backend": "memcpy (torch copy_, in-process)",
            "payload_mib": nbytes / 2**20,
            "first_publish_ms": 0.0,
            "publish_ms": 0.0,
            "slowest_publish_ms": 0.0,
            "fetch_ms": memcpy_s * 1e3,
            "fetch_gbps": memcpy_gbps,
            "fetch_vs_memcpy": 1.0,
            "end_to_end_gbps": memcpy_gbps,
            "end_to_end_vs_memcpy": 1.0,
        }
    ]
    runs = [(backend, sender, backend) for backend in backends]
    runs.insert(1, (OWNED, owned_sender, "object_store"))
    for label, publisher, backend in runs:
        timings = measure_backend(
            publisher, receiver, backend, shape, warmup=args.warmup, repeats=args.repeats
        )
        fetch_gbps = nbytes / timings.fetch_s / 1e9
        end_to_end_gbps = nbytes / (timings.publish_s + timings.fetch_s) / 1e9
        rows.append(
            {
                "backend": label + (" (gloo)" if backend == "ray_direct" else ""),
                "payload_mib": nbytes / 2**20,
                "first_publish_ms": timings.first_publish_s * 1e3,
                "publish_ms": timings.publish_s * 1e3,
                "slowest_publish_ms": timings.slowest_publish_s * 1e3,
                "fetch_ms": timings.fetch_s * 1e3,
                "fetch_gbps": fetch_gbps,
                "fetch_vs_memcpy": fetch_gbps / memcpy_gbps,
                "end_to_end_gbps": end_to_end_gbps,
                "end_to_end_vs_memcpy": end_to_end_gbps / memcpy_gbps,
            }
        )
    ray.shutdown()
    print(
        f"KV payload {tuple(shape)} bfloat16, {nbytes / 2**20:.0f} MiB; median of {args.repeats} "
        f"after {args.warmup} warm-up runs"
    )
    print_table(rows, [column for column in rows[0] if column != "payload_mib"])
    print(f"wrote {write_table(rows, 'kv_transfer')}")


if __name__ == "__main__":
    main()
