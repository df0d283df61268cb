"""The simulator's step costs measured on this machine: the real engine's prefill chunks and
decode steps (fitted into a ``StepCostModel``), and the object-store KV transfer bandwidth.

``raycake.actors.calibration.calibrate`` fits an instance's start-up model from one sample per
shape and no cache hits; here every shape is repeated (the median per shape is kept, so a burst
from another process on a shared machine does not move the fit), prefills run after cached
prefixes of several lengths, and decode batches run at two contexts per sequence, so all six
coefficients are determined. With Ray running, the measurement runs in a Ray worker with the
instances' CPU share: Ray caps a worker's torch threads at its ``num_cpus``, and step times on
1 thread differ from the driver's.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from raycake.engine.config import EngineConfig
from raycake.engine.engine_stats import StepRecord
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.engine.sampling_params import SamplingParams
from raycake.policies.step_cost_model import DecodeSample, PrefillSample, StepCostModel


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Which shapes to time: prefills of each new length after each cached length, decode
    batches of each size at each context per sequence, each shape ``repeats`` times."""

    prefill_new_tokens: tuple[int, ...] = (16, 64, 192, 512, 1024)
    prefill_cached_tokens: tuple[int, ...] = (0, 256, 768)
    decode_batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    decode_context_tokens: tuple[int, ...] = (32, 384)
    decode_steps: int = 6
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "prefill_new_tokens",
            "prefill_cached_tokens",
            "decode_batch_sizes",
            "decode_context_tokens",
        ):
            values = getattr(self, name)
            minimum = 0 if name == "prefill_cached_tokens" else 1
            if not values or not all(isinstance(v, int) and v >= minimum for v in values):
                raise ValueError(
                    f"step_plan.{name}: expected a non-empty tuple of integers >= {minimum}, "
                    f"got {values!r}"
                )
        for name in ("decode_steps", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"step_plan.{name}: expected an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class StepMeasurements:
    """Per-shape median step times (the fit's input) and how they were taken."""

    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    torch_threads: int
    seconds: float  # wall time of the measurement
    raw_steps: int = 0  # step records before taking medians
    notes: list[str] = field(default_factory=list)

    def fit(self) -> StepCostModel:
        return StepCostModel.fit(self.prefill, self.decode)


def measure_engine_steps(engine: LLMEngine, plan: StepPlan | None = None) -> StepMeasurements:
    """Time ``plan``'s shapes on ``engine`` (its prefix cache is reset afterwards)."""
    plan = plan or StepPlan()
    started = time.perf_counter()
    rng = random.Random(plan.seed)
    vocab = engine.model_config.vocab_size
    block_size = engine.config.cache.block_size
    by_prefill: dict[tuple[int, int], list[float]] = defaultdict(list)
    by_decode: dict[tuple[int, int], list[float]] = defaultdict(list)
    raw = 0
    notes: list[str] = []

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def run(prompts: list[list[int]], max_tokens: int) -> list[StepRecord]:
        for p in prompts:
            engine.add_request(
                p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            )
        steps = []
        while engine.has_unfinished_requests():
            engine.step()
            if engine.last_step is not None and engine.last_step.num_tokens:
                steps.append(engine.last_step)
        engine.pop_all_finished()
        return steps

    run([tokens(64)], 3)  # warm-up: first calls allocate and pick kernels
    for cached in plan.prefill_cached_tokens:
        # Whole blocks only: a partial block is never reused by the prefix cache.
        cached = cached // block_size * block_size
        prefix = tokens(cached)
        for new in plan.prefill_new_tokens:
            if cached + new + 1 > engine.max_model_len:
                notes.append(f"skipped prefill ({new} new after {cached} cached): too long")
                continue
            for _ in range(plan.repeats):
                if cached:
                    run([prefix], 1)  # (re)cache the prefix; its own steps are samples too
                for step in run([prefix + tokens(new)], 1):
                    raw += 1
                    hit = max(0, step.num_context_tokens - step.num_tokens)
                    by_prefill[(step.num_tokens, hit)].append(step.seconds)
    for context in plan.decode_context_tokens:
        for batch in plan.decode_batch_sizes:
            for _ in range(plan.repeats):
                engine.scheduler.reset_prefix_cache()
                for step in run([tokens(context) for _ in range(batch)], plan.decode_steps + 1):
                    raw += 1
                    if step.is_decode_only:
                        by_decode[(step.num_requests, step.num_context_tokens)].append(step.seconds)
    engine.scheduler.reset_prefix_cache()
    return StepMeasurements(
        prefill=[PrefillSample(n, c, statistics.median(s)) for (n, c), s in by_prefill.items()],
        decode=[DecodeSample(b, t, statistics.median(s)) for (b, t), s in by_decode.items()],
        torch_threads=torch.get_num_threads(),
        seconds=time.perf_counter() - started,
        raw_steps=raw,
        notes=notes,
    )


def _measure_in_worker(
    engine_config: EngineConfig, plan: StepPlan, num_threads: int
) -> StepMeasurements:
    # An instance's torch runs on its CPU share; more threads than cores spin and stall on a
    # busy machine, so the steps would be neither the instances' nor stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return measure_engine_steps(LLMEngine(engine_config), plan)
    finally:
        torch.set_num_threads(threads)


def measure_engine_steps_like_instances(
    engine_config: EngineConfig, plan: StepPlan | None = None, num_cpus: float = 1.0
) -> StepMeasurements:
    """``measure_engine_steps`` on a fresh engine with the instances' CPUs: in a Ray worker
    (in this process when Ray is not running), on ``max(1, int(num_cpus))`` torch threads."""
    import ray

    if not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus: expected a number > 0, got {num_cpus!r}")
    plan = plan or StepPlan()
    num_threads = max(1, int(num_cpus))
    if not ray.is_initialized():
        return _measure_in_worker(engine_config, plan, num_threads)
    task = ray.remote(num_cpus=num_cpus)(_measure_in_worker)
    return ray.get(task.remote(engine_config, plan, num_threads))


def relative_errors(
    model: StepCostModel, prefill: list[PrefillSample], decode: list[DecodeSample]
) -> list[float]:
    """|predicted - measured| / measured for each sample (held-out checks)."""
    errors = [
        abs(model.prefill_seconds(s.num_new_tokens, s.num_cached_tokens) - s.seconds) / s.seconds
        for s in prefill
    ]
    errors += [
        abs(model.decode_step_seconds(s.batch_size, s.total_context_tokens) - s.seconds) / s.seconds
        for s in decode
    ]
    return errors


class _Endpoint:
    """One side of a KV transfer through the object store (the cluster's default backend)."""

    def __init__(self) -> None:
        from raycake.transfer.object_store import ObjectStoreTransfer

        self.transfer = ObjectStoreTransfer()

    def publish(self, shape: tuple[int, ...], num_tokens: int) -> tuple[object, float]:
        from raycake.transfer import pack_kv

        kv = torch.randn(shape)  # [layers, 2, blocks, P, K, Dh]
        hashes = [i.to_bytes(16, "little") for i in range(shape[2])]
        started = time.perf_counter()
        header, payload = pack_kv(kv, hashes, num_tokens)
        handle = self.transfer.publish(header, payload)
        return handle, time.perf_counter() - started

    def fetch(self, handle: object) -> float:
        started = time.perf_counter()
        kv = self.transfer.fetch(handle).kv  # type: ignore[arg-type]
        float(kv.sum())  # touch every byte, as the decode engine's import does
        return time.perf_counter() - started

    def release(self, handle: object) -> None:
        self.transfer.release(handle)  # type: ignore[arg-type]


def measure_transfer_bandwidth(
    engine_config: EngineConfig, num_blocks: int = 32, repeats: int = 3
) -> float:
    """Bytes per second of a prefill -> decode KV hand-off of ``num_blocks`` blocks through the
    object store, publish (pack + put) plus fetch (get + unpack), between two actors; median
    of ``repeats``. Needs Ray running."""
    import ray

    from raycake.model.loader import DTYPES, read_model_config, resolve_model_path

    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks: expected an integer >= 1, got {num_blocks!r}")
    if not ray.is_initialized():
        raise RuntimeError("measure_transfer_bandwidth: Ray is not running (call ray.init)")
    model = read_model_config(resolve_model_path(engine_config.model))
    block_size = engine_config.cache.block_size
    shape = (
        model.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        model.num_key_value_heads,
        model.head_dim,
    )
    num_bytes = num_blocks * kv_cache_bytes_per_block(
        model, block_size, DTYPES[engine_config.dtype]
    )
    endpoint = ray.remote(num_cpus=0)(_Endpoint)
    sender, receiver = endpoint.remote(), endpoint.remote()
    try:
        rates = []
        for _ in range(repeats + 1):  # the first round pays actor and store start-up
            handle, publish_s = ray.get(sender.publish.remote(shape, num_blocks * block_size))
            fetch_s = ray.get(receiver.fetch.remote(handle))
            ray.get(sender.release.remote(handle))
            rates.append(num_bytes / (publish_s + fetch_s))
        return statistics.median(rates[1:])
    finally:
        ray.kill(sender)
        ray.kill(receiver)
