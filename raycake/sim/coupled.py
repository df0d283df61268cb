"""A simulated cluster of coupled instances: the baseline Mooncake's disaggregation is measured
against (the paper's vLLM instances, each running prefill and decode on the same GPUs).

N instances (``coupled_instance.CoupledInstance``: vLLM-style continuous batching with chunked
prefill and automatic prefix caching) behind a router. A router is any scheduling policy: it
sees each instance as both a prefill view (queued prefill seconds as routed, requests on it,
its cached prefix of the prompt) and a decode view (requests, context, unreserved KV blocks),
and ``ColocatedRouting`` makes its choice one instance: the prefill instance it picked, whose
decode view then gives the predicted TBT. ``AdmissionControl`` around that applies the
conductor's early-rejection rule. There is no global store.
NOTE: that rule predicts a decode step without the prompt chunks sharing it, so on coupled
instances it rejects for TTFT but cannot see the TBT that chunked prefill causes.

TTFT runs from arrival to the end of the step that computes the prompt's last chunk; TBT is the
mean of the slowest 10% of the token intervals (as ``event_loop.py``). The outputs have the
disaggregated simulator's columns and summary (``results.py``); a coupled instance counts as
both a prefill and a decode instance, its prefill (decode) busy time being that of the steps
with prompt chunks (decode tokens) in them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass

import pyarrow as pa

from raycake.policies.admission_control import AdmissionControl
from raycake.policies.cluster_view import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    Rejection,
    RequestView,
    ScheduleDecision,
    SchedulingPolicy,
)
from raycake.policies.estimates import predict_decode_load, predict_tbt
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.config import check_step_timer
from raycake.sim.coupled_instance import CoupledInstance, CoupledRequest
from raycake.sim.results import RequestRows, SimulationResult, summarize
from raycake.sim.roofline import RooflineCostModel
from raycake.sim.traces import TRACE_BLOCK_SIZE
from raycake.validation import is_count, require

# vLLM's SchedulerConfig default max_num_batched_tokens: small chunks keep decode steps short.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# No store: requests never fetch, so the views' link bandwidth never enters a prediction.
_NO_STORE_BANDWIDTH = 1.0


@dataclass(frozen=True, kw_only=True)
class CoupledConfig:
    """N coupled instances; ``from_roofline`` derives the numbers from GPU and model."""

    num_instances: int
    cost_model: StepCostModel  # what routers and admission predict with
    kv_blocks: int  # KV blocks per instance: running requests and the prefix cache share them
    max_num_seqs: int = 128
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = TRACE_BLOCK_SIZE
    prefix_caching: bool = True
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # What times the steps (a ``RooflineCostModel`` times mixed steps as one pass); None: the
    # cost model (chunks and decode batch added).
    step_timer: object | None = None

    def __post_init__(self) -> None:
        for name in ("num_instances", "kv_blocks", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            require(is_count(value, 1), f"coupled.{name}", "an integer >= 1", value)
        require(
            is_count(self.max_num_batched_tokens, self.max_num_seqs),
            "coupled.max_num_batched_tokens",
            f"an integer >= max_num_seqs ({self.max_num_seqs}): each decoding request takes "
            "a token of every step",
            self.max_num_batched_tokens,
        )
        require(
            isinstance(self.prefix_caching, bool),
            "coupled.prefix_caching",
            "a bool",
            self.prefix_caching,
        )
        for name in ("ttft_slo_s", "tbt_slo_s"):
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, (int, float)) and 0 < value < math.inf),
                f"coupled.{name}",
                "None or a finite number > 0 (seconds)",
                value,
            )
        require(
            isinstance(self.cost_model, StepCostModel),
            "coupled.cost_model",
            "a StepCostModel",
            self.cost_model,
        )
        check_step_timer("coupled.step_timer", self.step_timer)

    @classmethod
    def from_roofline(
        cls,
        roofline: RooflineCostModel,
        *,
        num_instances: int,
        block_size: int = TRACE_BLOCK_SIZE,
        max_num_seqs: int = 128,
        gpu_memory_utilization: float = 0.9,
        **overrides: object,
    ) -> CoupledConfig:
        """Instances of ``roofline``'s GPU and model, steps timed by the roofline itself; KV
        capacity as a disaggregated instance's (``SimulationConfig.from_roofline``)."""
        values: dict[str, object] = {
            "num_instances": num_instances,
            "cost_model": roofline.step_cost_model(max_num_seqs=max_num_seqs),
            "kv_blocks": roofline.kv_capacity_blocks(block_size, gpu_memory_utilization),
            "max_num_seqs": max_num_seqs,
            "block_size": block_size,
            "step_timer": roofline,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


class ColocatedRouting:
    """A router's choice as one coupled instance: the prefill instance it picked serves the
    decode too, and that instance's decode view gives the predicted TBT."""

    def __init__(self, inner: SchedulingPolicy) -> None:
        self.inner = inner
        self.name = inner.name

    def schedule(self, request: RequestView, cluster: ClusterView) -> ScheduleDecision | Rejection:
        decision = self.inner.schedule(request, cluster)
        if isinstance(decision, Rejection):
            return decision
        iid = decision.prefill_instance_id
        view = next(d for d in cluster.decode if d.instance_id == iid)
        tbt = predict_tbt(request, view, predict_decode_load(view, 0.0))
        return dataclasses.replace(decision, decode_instance_id=iid, predicted_tbt_s=tbt)


def coupled_router(policy: SchedulingPolicy) -> SchedulingPolicy:
    """``policy`` choosing coupled instances; an ``AdmissionControl`` stays outermost, so its
    rule judges the one instance chosen."""
    if isinstance(policy, AdmissionControl):
        return AdmissionControl(ColocatedRouting(policy.inner), predictive=policy.predictive)
    return ColocatedRouting(policy)


def simulate_coupled(
    trace: pa.Table, policy: SchedulingPolicy, config: CoupledConfig, *, label: str | None = None
) -> SimulationResult:
    """Replay ``trace`` (``read_trace``/``generate_trace`` schema) through ``config``'s coupled
    instances, routed by ``policy`` (a fresh object: policies keep state)."""
    require(isinstance(policy, SchedulingPolicy), "policy", "a SchedulingPolicy", policy)
    require(isinstance(config, CoupledConfig), "config", "a CoupledConfig", config)
    require(trace.num_rows > 0, "trace", "at least one request", trace.num_rows)
    return CoupledCluster(trace, coupled_router(policy), config).run(label)


class CoupledCluster:
    """One run: the router at each arrival, the instances' steps in between."""

    def __init__(self, trace: pa.Table, policy: SchedulingPolicy, config: CoupledConfig) -> None:
        self.policy, self.config = policy, config
        timer = config.step_timer or config.cost_model
        self.instances = [
            CoupledInstance(
                i,
                timer=timer,
                kv_blocks=config.kv_blocks,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                block_size=config.block_size,
                prefix_caching=config.prefix_caching,
                on_finish=self._finish,
            )
            for i in range(config.num_instances)
        ]
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self.where: dict[int, CoupledInstance] = {}
        self.rows = RequestRows()
        columns = [
            trace.column(name).to_pylist()
            for name in ("timestamp_ms", "input_length", "output_length", "hash_ids")
        ]
        self.requests = [
            CoupledRequest(i, ts / 1000.0, n_in, n_out, hashes)
            for i, (ts, n_in, n_out, hashes) in enumerate(zip(*columns, strict=True))
        ]
        if any(b < a for a, b in itertools.pairwise(columns[0])):
            self.requests.sort(key=lambda r: r.arrival_s)  # stable: file order among ties

    def run(self, label: str | None = None) -> SimulationResult:
        started = time.perf_counter()
        for r in self.requests:
            for inst in self.instances:
                inst.advance(r.arrival_s)
            self._arrive(r)
        for inst in self.instances:
            inst.advance(math.inf)
            inst.check_invariants()
        table = self.rows.to_table()
        insts = self.instances
        return SimulationResult(
            requests=table,
            summary=summarize(
                table,
                policy=label or self.policy.name,
                num_prefill=len(insts),
                num_decode=len(insts),
                prefill_busy_s=sum(i.prefill_busy_s for i in insts),
                decode_busy_s=sum(i.decode_busy_s for i in insts),
                decode_steps=sum(i.decode_steps for i in insts),
                decode_step_tokens=sum(i.decode_step_tokens for i in insts),
                wall_s=time.perf_counter() - started,
            ),
        )

    def _arrive(self, r: CoupledRequest) -> None:
        config, block_size = self.config, self.config.block_size
        num_full_blocks = r.num_prompt_tokens // block_size
        request = RequestView(
            request_id=f"r{r.index}",
            num_prompt_tokens=r.num_prompt_tokens,
            block_size=block_size,
            max_tokens=r.num_decode_tokens + 1,
            ttft_slo_s=config.ttft_slo_s,
            tbt_slo_s=config.tbt_slo_s,
            prefix_hashes=tuple(r.hashes),
        )
        cluster = ClusterView(
            prefill=[
                PrefillInstanceView(
                    instance_id=inst.instance_id,
                    queued_prefill_seconds=inst.queued_prefill_s,
                    # Every request on it: sgl-router's load of a non-disaggregated worker.
                    num_queued=inst.assigned,
                    cost_model=config.cost_model,
                    cached_prefix_blocks=(
                        inst.cache.prefix_length(r.hashes, num_full_blocks)
                        if config.prefix_caching
                        else 0
                    ),
                )
                for inst in self.instances
            ],
            decode=[
                DecodeInstanceView(
                    instance_id=inst.instance_id,
                    num_running=inst.assigned,
                    max_num_seqs=config.max_num_seqs,
                    total_context_tokens=inst.assigned_context_tokens,
                    free_kv_blocks=max(0, inst.kv_capacity - inst.reserved_blocks),
                    cost_model=config.cost_model,
                    mean_remaining_tokens=(
                        inst.assigned_remaining_tokens / inst.assigned
                        if inst.assigned and inst.assigned_remaining_tokens > 0
                        else None
                    ),
                )
                for inst in self.instances
            ],
            transfer_bandwidth_bytes_per_s=_NO_STORE_BANDWIDTH,
        )
        decision = self.policy.schedule(request, cluster)
        r.kv_blocks = request.num_kv_blocks_needed
        if isinstance(decision, Rejection):
            self._reject(r, decision.reason, decision.predicted_ttft_s, decision.predicted_tbt_s)
            return
        inst = self.by_id[decision.prefill_instance_id]
        if r.kv_blocks > inst.kv_capacity:
            self._reject(
                r,
                f"decode capacity: {r.kv_blocks} KV blocks needed > {inst.kv_capacity} per "
                f"coupled instance",
                decision.predicted_ttft_s,
                decision.predicted_tbt_s,
            )
            return
        r.predicted_prefill_s = decision.predicted_prefill_s
        r.predicted_ttft_s, r.predicted_tbt_s = decision.predicted_ttft_s, decision.predicted_tbt_s
        self.where[r.index] = inst
        inst.route(r, r.arrival_s)

    def _finish(self, r: CoupledRequest, end_s: float, tbt_s: float, interval_s: float) -> None:
        config, iid = self.config, self.where.pop(r.index).instance_id
        ttft = r.first_token_s - r.arrival_s
        self._row(
            r,
            rejected=False,
            reject_reason=None,
            prefill_instance=iid,
            decode_instance=iid,
            local_cached_tokens=r.cached_tokens,
            predicted_ttft_s=r.predicted_ttft_s,
            predicted_tbt_s=r.predicted_tbt_s,
            queue_s=r.admitted_s - r.arrival_s,
            ttft_s=ttft,
            tbt_s=tbt_s,
            mean_token_interval_s=interval_s,
            e2e_s=end_s - r.arrival_s,
            met_ttft_slo=config.ttft_slo_s is None or ttft <= config.ttft_slo_s,
            met_tbt_slo=config.tbt_slo_s is None or math.isnan(tbt_s) or tbt_s <= config.tbt_slo_s,
        )

    def _reject(self, r: CoupledRequest, reason: str, ttft_s: float, tbt_s: float | None) -> None:
        nan = math.nan
        self._row(
            r,
            rejected=True,
            reject_reason=reason,
            prefill_instance=None,
            decode_instance=None,
            local_cached_tokens=0,
            predicted_ttft_s=ttft_s,
            predicted_tbt_s=nan if tbt_s is None else tbt_s,
            queue_s=nan,
            ttft_s=nan,
            tbt_s=nan,
            mean_token_interval_s=nan,
            e2e_s=0.0,
            met_ttft_slo=False,
            met_tbt_slo=False,
        )

    def _row(self, r: CoupledRequest, **outcome: object) -> None:
        self.rows.add(
            r.index,
            request_id=f"r{r.index}",
            arrival_s=r.arrival_s,
            num_prompt_tokens=r.num_prompt_tokens,
            num_output_tokens=r.num_decode_tokens + 1,
            store_fetched_tokens=0,
            **outcome,
        )
