"""Expert parallelism: ExpertShard holds a contiguous range of every MoE layer's experts;
ShardedExperts stands in for a layer's local experts and sends each shard one message per step;
ExpertShards owns the actors and how the messages travel.

Two transports carry the same ``ShardStep`` message to ``ExpertShard.run``:

- ``"compiled"``: one Ray Compiled Graph over every shard and every MoE layer (the layer index is
  in the message). Each shard reads its own input channel, the driver reads all outputs: shared
  memory channels instead of task submission and the object store for every call.
- ``"calls"``: ordinary actor calls; also what a step falls back to while a shard restarts.

NOTE: in this Ray version a compiled graph's channel reads busy-wait: each shard actor spins a
core between steps, even when idle, and the driver spins in ``ray.get``. Given a core for each
busy thread, the graph cuts the per-layer cost; without, the spinners starve the threads that
compute. Measured on a shared 2-core machine: 1 shard and 1 driver thread, a 1-token layer took
0.5-1.0 ms compiled vs 1.5-2.9 ms by calls; 2 shards and 2 driver threads, generation ran up to
11x slower compiled. So ``"auto"`` (the default) picks compiled only where the cores are there
(``choose_transport``).

The shard loads its experts from the checkpoint itself, so Ray restarting a dead shard
(``max_restarts``) brings the same weights back, and ``max_task_retries`` re-runs an ordinary call
that was in flight. A compiled graph does not survive an actor's death: the error surfaces from
``ray.get``, so the step is run again by ordinary calls (which wait for the restart) and the graph
is compiled again on the next step. Tokens travel as numpy arrays (zero-copy through the object
store; a torch tensor would be copied), bfloat16 as its raw 16-bit pattern.

Legend: N kept (token, choice) pairs grouped by expert, H hidden size, E experts.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from torch import nn

from raycake.model.moe import FusedExperts, MoEFeedForward, combine, plan_dispatch

logger = logging.getLogger(__name__)

TRANSPORTS = ("compiled", "calls")


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the array's memory. NOTE: arrays from the object store are read-only;
    the tensors made here are only ever read (matmul inputs, then copied by torch.cat)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class ExpertRange:
    """Experts ``start .. end-1`` of every MoE layer."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(
                f"expert range: expected 0 <= start < end, got {self.start}..{self.end}"
            )


def expert_ranges(num_experts: int, num_shards: int) -> list[ExpertRange]:
    """Split E experts into ``num_shards`` contiguous ranges as even as possible."""
    if not 1 <= num_shards <= num_experts:
        raise ValueError(f"moe.num_expert_shards: expected 1..{num_experts}, got {num_shards}")
    bounds = [round(i * num_experts / num_shards) for i in range(num_shards + 1)]
    return [ExpertRange(a, b) for a, b in itertools.pairwise(bounds)]


class ShardStep(NamedTuple):
    """One shard's share of one MoE layer in one step: the message both transports carry."""

    layer: int  # index of the model layer whose experts run
    grouped: np.ndarray  # [n, H] the shard's (token, choice) rows sorted by expert; n may be 0
    counts: list[int]  # rows per expert of the shard's range, summing to n


class ExpertShard:
    """A plain class; ``create_expert_shards`` runs it as a Ray actor."""

    def __init__(
        self,
        model_dir: str | Path,
        experts: ExpertRange,
        dtype: str = "float32",
        quantization: str | None = None,
        int8_threshold: float = 6.0,
    ) -> None:
        from raycake.model.loader import load_model

        model = load_model(model_dir, dtype=dtype)
        self.experts = experts
        self.dtype = next(model.parameters()).dtype
        self.layers: dict[int, nn.Module] = {}  # FusedExperts or Int8FusedExperts
        for index, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, MoEFeedForward):
                full = layer.mlp.experts
                part = FusedExperts(experts.end - experts.start, 1, 1)
                part.intermediate_size = full.intermediate_size
                part.gate_up_proj = nn.Parameter(
                    full.gate_up_proj[experts.start : experts.end].clone()
                )
                part.down_proj = nn.Parameter(full.down_proj[experts.start : experts.end].clone())
                part.requires_grad_(False)
                if quantization == "int8":  # the engine's model is int8: so are its experts
                    from raycake.model.int8_linear import Int8FusedExperts

                    part = Int8FusedExperts.from_experts(part, int8_threshold)
                self.layers[index] = part
        if not self.layers:
            raise ValueError(f"{model_dir}: the model has no MoE layers to shard")

    def ready(self) -> ExpertRange:
        return self.experts

    def expert_kinds(self) -> list[str]:
        """The module class of each MoE layer's experts here (int8 or float)."""
        return [type(experts).__name__ for _, experts in sorted(self.layers.items())]

    def node_cores(self) -> tuple[str, int]:
        """(Ray node id, CPU cores this process may run on): what ``choose_transport`` weighs."""
        return ray.get_runtime_context().get_node_id(), usable_cores()

    @torch.inference_mode()
    def run(self, step: ShardStep) -> np.ndarray:
        """step.grouped [n, H] -> each row's unweighted expert output [n, H], same order."""
        x = from_wire(step.grouped, self.dtype)
        return to_wire(self.layers[step.layer].run_grouped(x, step.counts))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def choose_transport(
    shard_nodes: list[tuple[str, int]], driver_node: str, driver_threads: int
) -> str:
    """``"compiled"`` when every node holding shards has a core for each thread busy there while
    a compiled graph runs (its shards spin; on the driver's node also the driver's torch threads,
    which compute between layers), else ``"calls"``. shard_nodes: (node id, usable cores) per
    shard, as ``ExpertShard.node_cores`` reports; driver_threads: the driver's torch threads."""
    busy = Counter(node for node, _ in shard_nodes)
    if driver_node in busy:
        busy[driver_node] += driver_threads
    cores = dict(shard_nodes)
    return "compiled" if all(busy[node] <= cores[node] for node in busy) else "calls"


@dataclass
class TransportStats:
    """How an ExpertShards' layer-steps travelled; tests and benchmarks read these."""

    compiled_steps: int = 0  # layer-steps completed through the compiled graph
    call_steps: int = 0  # layer-steps run by ordinary actor calls
    compiles: int = 0  # graphs compiled: the first, then one after each recovery
    recoveries: int = 0  # compiled layer-steps that failed and were re-run by ordinary calls
    compile_seconds: float = 0.0  # time spent compiling, all graphs together


class ExpertShards:
    """The ExpertShard actors of one model and the transport its MoE layers reach them by.

    Contract: ``run`` is called by one thread at a time (the engine's step: a compiled graph is
    not thread-safe). Whoever created the shards calls ``close()``, which tears the graph down and
    kills the actors. Iterating yields ``(handle, ExpertRange)`` pairs in expert order.
    """

    def __init__(
        self,
        shards: list[tuple[Any, ExpertRange]],
        transport: str,
        step_timeout_s: float = 60.0,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
        self.shards = list(shards)
        self.transport = transport
        # Ray's own default (10 s) is short for a long prefill on CPU; an actor's death does not
        # wait for it (the graph is torn down and ray.get raises at once).
        self.step_timeout_s = step_timeout_s
        self.stats = TransportStats()
        self._graph: Any = None  # CompiledDAG; compiled on first use and after each recovery

    def __iter__(self) -> Iterator[tuple[Any, ExpertRange]]:
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> tuple[Any, ExpertRange]:
        return self.shards[index]

    @property
    def ranges(self) -> list[ExpertRange]:
        return [experts for _, experts in self.shards]

    def run(self, steps: list[ShardStep]) -> list[np.ndarray]:
        """One step per shard, in shard order -> each shard's output [n, H], in the same order."""
        if self.transport == "compiled":
            try:
                graph = self._graph if self._graph is not None else self._compile()
                outputs = ray.get(graph.execute(*steps), timeout=self.step_timeout_s)
            except Exception as error:
                # Whatever broke the graph (usually a shard that died: a channel error, or the
                # task error of its execution loop), re-running the step by ordinary calls is
                # right: they wait for the restart and retry, and a genuine bug in the shard
                # raises again from there.
                logger.warning("expert shards: compiled step failed (%r); re-run by calls", error)
                self.stats.recoveries += 1
                self._teardown(kill_actors=False)
            else:
                self.stats.compiled_steps += 1
                return outputs
        return self._run_by_calls(steps)

    def release_graph(self) -> None:
        """Tear the compiled graph down, keeping the actors; the next step compiles it again
        (a fraction of a second). NOTE: a compiled graph's actors busy-wait on their input
        channels in this Ray version, a core each even when idle: release it when the shards
        will sit idle for long."""
        self._teardown(kill_actors=False)

    def close(self) -> None:
        """Tear down the compiled graph and kill the shard actors (no restart); idempotent."""
        self._teardown(kill_actors=True)
        for handle, _ in self.shards:
            ray.kill(handle)

    def _compile(self) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        start = time.perf_counter()
        try:
            with InputNode() as steps:
                # NOTE: shard i reads input i, so each shard's rows go through its own channel,
                # and every shard runs every execution (an empty ShardStep when it has no rows).
                dag = MultiOutputNode(
                    [handle.run.bind(steps[i]) for i, (handle, _) in enumerate(self.shards)]
                )
            self._graph = dag.experimental_compile()
        except ray.exceptions.RayError:
            raise  # a shard died while compiling: recover this step, compile again next step
        except Exception as error:
            # This Ray cannot compile the graph here: ordinary calls still work, so keep serving.
            logger.warning("expert shards: cannot compile (%r); using ordinary calls", error)
            self.transport = "calls"
            raise
        self.stats.compiles += 1
        self.stats.compile_seconds += time.perf_counter() - start
        return self._graph

    def _teardown(self, kill_actors: bool) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            graph.teardown(kill_actors=kill_actors)

    def _run_by_calls(self, steps: list[ShardStep]) -> list[np.ndarray]:
        # Submit all, then wait once; a shard with no rows gets no call.
        busy = [i for i, step in enumerate(steps) if len(step.grouped)]
        outputs = ray.get([self.shards[i][0].run.remote(steps[i]) for i in busy])
        results = [step.grouped for step in steps]  # an empty input is its own (empty) output
        for i, output in zip(busy, outputs, strict=True):
            results[i] = output
        self.stats.call_steps += 1
        return results


class ShardedExperts(nn.Module):
    """Drop-in for a layer's FusedExperts: the experts live in ExpertShard actors."""

    def __init__(self, layer: int, num_experts: int, shards: ExpertShards) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.shards = shards

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        plan = plan_dispatch(expert_indices, kept, self.num_experts)
        grouped = x[plan.tokens]  # [N, H]
        steps, start = [], 0
        for experts in self.shards.ranges:  # one message per shard: all of its experts' rows
            counts = plan.counts[experts.start : experts.end]
            n = sum(counts)
            steps.append(ShardStep(self.layer, to_wire(grouped[start : start + n]), counts))
            start += n
        # torch.cat copies: nothing downstream points into the transport's read-only buffers.
        out = torch.cat([from_wire(a, x.dtype) for a in self.shards.run(steps)])  # [N, H]
        return combine(x, plan, gates, out)


def create_expert_shards(
    model_dir: str | Path,
    num_experts: int,
    num_shards: int,
    dtype: str = "float32",
    max_restarts: int = 2,
    actor_options: dict[str, Any] | None = None,
    transport: str = "auto",
    quantization: str | None = None,
    int8_threshold: float = 6.0,
) -> ExpertShards:
    """Start the shard actors (restartable; an in-flight call is retried after a restart).
    ``transport``: "compiled", "calls", or "auto" (``choose_transport``, with this process as
    the driver). The caller owns the result and calls its ``close()``."""
    if transport not in ("auto", *TRANSPORTS):
        raise ValueError(f"transport: expected 'auto' or one of {TRANSPORTS}, got {transport!r}")
    remote = ray.remote(ExpertShard).options(
        max_restarts=max_restarts, max_task_retries=-1, **(actor_options or {})
    )
    shards = [
        (remote.remote(str(model_dir), r, dtype, quantization, int8_threshold), r)
        for r in expert_ranges(num_experts, num_shards)
    ]
    shard_nodes = ray.get([handle.node_cores.remote() for handle, _ in shards])  # also: ready
    if transport == "auto":
        driver_node = ray.get_runtime_context().get_node_id()
        transport = choose_transport(shard_nodes, driver_node, torch.get_num_threads())
    return ExpertShards(shards, transport)


def attach_expert_shards(model: nn.Module, shards: ExpertShards) -> int:
    """Route every MoE layer's experts through the shards and drop the local expert weights;
    returns how many layers now run expert-parallel."""
    attached = 0
    for index, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoEFeedForward):
            layer.mlp.experts = ShardedExperts(index, layer.mlp.num_experts, shards)
            attached += 1
    return attached


def enable_expert_parallelism(engine: Any) -> ExpertShards:
    """Start the shards ``engine.config.moe`` asks for and route the model's MoE layers through
    them; for a dense model or ``num_expert_shards == 0`` returns an empty ExpertShards."""
    config = engine.config
    num_experts = engine.model.config.num_experts
    if not config.moe.num_expert_shards or not num_experts:
        return ExpertShards([], "calls")
    shards = create_expert_shards(
        engine.model_dir,
        num_experts,
        config.moe.num_expert_shards,
        config.dtype,
        transport=config.moe.expert_transport,
        quantization=config.quantization,
        int8_threshold=config.int8_threshold,
    )
    attach_expert_shards(engine.model, shards)
    return shards
