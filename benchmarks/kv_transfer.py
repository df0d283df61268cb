"""GB/s moving KV blocks between two Ray actors with each transfer backend, next to memcpy.

    python -m benchmarks.kv_transfer [--mib 64] [--repeats 5]

Each run: the sender packs and publishes a fresh payload (bfloat16, Llama-3-8B-like layout), the
receiving actor fetches it and touches every 4 KiB page, the sender releases it. fetch_ms is the
median inside the receiver (what a decode instance waits for); publish_ms the sender's part. The
memcpy row is an in-process torch ``copy_`` of the same bytes, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

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


def kv_shape(mib: int) -> tuple[int, ...]:
    block_bytes = NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2  # 2 MiB
    num_blocks = max(1, mib * 2**20 // block_bytes)
    return (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def touch(kv: torch.Tensor) -> int:
    """Read one byte of every page, so lazily mapped memory really arrives."""
    return int(kv.reshape(-1).view(torch.uint8)[::PAGE].sum())


@ray.remote(**RAY_DIRECT_ACTOR_OPTIONS)
class BenchPeer(RayDirectKVEndpoint):
    def __init__(self, backends: list[str]):
        options = {"ray_direct": {"endpoint": self}}
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


def measure_backend(sender, receiver, backend: str, shape, repeats: int) -> tuple[float, float]:
    publish_s, fetch_s = [], []
    for run in range(repeats + 1):  # the first run warms up connections and buffers
        handle, seconds = ray.get(sender.publish.remote(backend, shape))
        fetched = ray.get(receiver.fetch.remote(backend, handle))
        ray.get(sender.release.remote(backend, handle))
        if run > 0:
            publish_s.append(seconds)
            fetch_s.append(fetched)
    return statistics.median(publish_s), statistics.median(fetch_s)


def measure_memcpy(shape: tuple[int, ...], repeats: int) -> float:
    src = torch.randn(shape).to(torch.bfloat16)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

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

    memcpy_gbps = nbytes / memcpy_s / 1e9
    rows = [
        {
            "backend": "memcpy (torch copy_, in-process)",
            "payload_mib": nbytes / 2**20,
            "publish_ms": 0.0,
            "fetch_ms": memcpy_s * 1e3,
            "fetch_gbps": memcpy_gbps,
            "end_to_end_gbps": memcpy_gbps,
            "vs_memcpy": 1.0,
        }
    ]
    for backend in backends:
        publish_s, fetch_s = measure_backend(sender, receiver, backend, shape, args.repeats)
        rows.append(
            {
                "backend": backend + (" (gloo)" if backend == "ray_direct" else ""),
                "payload_mib": nbytes / 2**20,
                "publish_ms": publish_s * 1e3,
                "fetch_ms": fetch_s * 1e3,
                "fetch_gbps": nbytes / fetch_s / 1e9,
                "end_to_end_gbps": nbytes / (publish_s + fetch_s) / 1e9,
                "vs_memcpy": (nbytes / fetch_s / 1e9) / memcpy_gbps,
            }
        )
    ray.shutdown()
    print(f"KV payload {tuple(shape)} bfloat16, {nbytes / 2**20:.0f} MiB; median of {args.repeats}")
    print_table(rows, list(rows[0]))
    print(f"wrote {write_table(rows, 'kv_transfer')}")


if __name__ == "__main__":
    main()
