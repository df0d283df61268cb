"""Calibrate the simulator against the real local cluster, and say how far apart they are.

1. Step costs: the real engine's prefill chunks and decode steps on this machine, fitted into a
   ``StepCostModel`` (``steps``), and the object-store KV transfer bandwidth.
2. Cluster overheads: what a request pays beyond engine steps (conductor and actor calls, KV
   export and publish, a streamed delta per token, CPU shared by co-located actors), fitted to
   replayed requests (``overheads``; cross-fitted: never to the requests they predict):
   ``ClusterOverheads``, which ``CalibratedStepTimer`` adds to the simulated steps, with the
   measured token-interval spread.
3. Replay: a small Mooncake-format trace, mapped onto engine blocks (``replay``), is
   replayed on the cluster at its timestamps and simulated with the same policy type and
   options, timed as the driver times it (``driver_timed``); per request, the relative TTFT
   and TBT errors are summarised (goal: median <= 25%). Beside it: the twin without the interval
   spread, engine step costs alone, and a second real replay (the run-to-run noise floor).

Rerun the calibrated twin: ``simulate_as_driver(trace, policy, report.sim_config,
report.overheads.handoff_s)`` on an engine-block trace (``trace_in_engine_blocks``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa

from raycake.cluster.cluster import Cluster
from raycake.engine.runner import kv_cache_bytes_per_block, num_blocks_for
from raycake.model.loader import DTYPES, read_model_config, resolve_model_path
from raycake.policies.cluster_view import SchedulingPolicy
from raycake.policies.scheduling import scheduling_policy_from_config
from raycake.policies.step_cost_model import StepCostModel
from raycake.sim.calibration.driver_timed import simulate_as_driver
from raycake.sim.calibration.overheads import (
    CalibratedStepTimer,
    ClusterOverheads,
    fit_overheads,
)
from raycake.sim.calibration.replay import (
    COMPARED_METRICS,
    MetricComparison,
    as_simulated,
    compare_metrics,
    paired_requests,
    replay_on_cluster,
    trace_in_engine_blocks,
)
from raycake.sim.calibration.steps import (
    StepMeasurements,
    StepPlan,
    measure_engine_steps_like_instances,
    measure_transfer_bandwidth,
    relative_errors,
)
from raycake.sim.config import SimulationConfig
from raycake.sim.traces import SyntheticTraceConfig, generate_trace

ERROR_GOAL = 0.25
# Seeded simulations per prediction of the calibrated twin (its decode steps are random draws).
SIMULATION_DRAWS = 15


def calibration_trace(num_requests: int = 60, rate_per_s: float = 5.0, seed: int = 0) -> pa.Table:
    """A small Mooncake-format trace (512-token blocks) whose prompts, mapped onto 16-token
    engine blocks (/32), fit the embedded model: 2-20 blocks (~30-1,300 engine tokens), shared
    agent contexts and growing chat sessions, outputs of ~24 tokens (at most 96)."""
    return generate_trace(
        SyntheticTraceConfig(
            num_requests=num_requests,
            rate_per_s=rate_per_s,
            num_agent_contexts=4,
            agent_context_tokens=12_000,
            turns_per_session=4,
            first_turn_tokens=6_000,
            turn_growth_tokens=3_000,
            single_prompt_tokens=8_000,
            mean_output_tokens=24,
            max_input_tokens=40_000,
            seed=seed,
        )
    )


def simulation_config_for(
    cluster: Cluster, cost_model: StepCostModel, timer: CalibratedStepTimer, bandwidth: float
) -> SimulationConfig:
    """The simulated twin of ``cluster``: its instance counts, block size, KV pools (every
    instance's engine pool; the store shards' bytes in blocks), batch limit and SLOs."""
    config = cluster.config
    engine = config.engine
    model = read_model_config(resolve_model_path(engine.model))
    dtype = DTYPES[engine.dtype]
    block_bytes = kv_cache_bytes_per_block(model, engine.cache.block_size, dtype)
    pool_blocks = num_blocks_for(model, engine.cache, dtype)
    store_blocks = config.num_store_shards * config.store_capacity_bytes // block_bytes
    return SimulationConfig(
        num_prefill=config.num_prefill,
        num_decode=config.num_decode,
        cost_model=cost_model,
        kv_block_bytes=block_bytes,
        transfer_bandwidth_bytes_per_s=bandwidth,
        decode_kv_blocks=pool_blocks,
        prefill_cache_blocks=pool_blocks if engine.cache.enable_prefix_caching else 0,
        store_capacity_blocks=store_blocks if config.scheduling.use_store else 0,
        max_num_seqs=engine.scheduler.max_num_seqs,
        block_size=engine.cache.block_size,
        ttft_slo_s=config.scheduling.ttft_slo_s,
        tbt_slo_s=config.scheduling.tbt_slo_s,
        eviction_policy=engine.cache.eviction_policy,
        step_timer=timer,
    )


@dataclass(frozen=True)
class CalibrationReport:
    """What was measured, the simulated twin it produced, and how the replays compare."""

    engine_cost_model: StepCostModel  # fitted from engine steps
    step_fit_median_rel_error: float  # of that fit over its own per-shape medians
    step_measurements: StepMeasurements
    transfer_bandwidth_bytes_per_s: float
    overheads: ClusterOverheads  # fitted to every replayed request (for ``sim_config``)
    fold_overheads: list[ClusterOverheads]  # fitted without each fold, which they predicted
    sim_config: SimulationConfig
    # Per request: real and held-out simulated timings (calibrated; others as <variant>_sim_*).
    requests: pa.Table
    # Variants calibrated, no_jitter, engine_only, and real_repeat (a second real replay).
    comparisons: list[MetricComparison]
    goal: float = ERROR_GOAL

    def comparison(self, metric: str, variant: str = "calibrated") -> MetricComparison:
        for c in self.comparisons:
            if c.metric == metric and c.variant == variant:
                return c
        raise KeyError(f"no comparison of {metric!r} for variant {variant!r}")

    @property
    def passed(self) -> bool:
        """Median relative error of TTFT and of TBT within ``goal``, with overheads."""
        return all(
            self.comparison(metric).median_rel_error <= self.goal for metric in ("ttft", "tbt")
        )


def calibrate_simulator(
    cluster: Cluster,
    trace: pa.Table,
    *,
    num_folds: int = 5,
    repeat_replay: bool = True,
    step_plan: StepPlan | None = None,
    seed: int = 0,
    goal: float = ERROR_GOAL,
) -> CalibrationReport:
    """Measure engine steps and transfers, replay ``trace`` (Mooncake format, 512-token blocks,
    mapped onto engine blocks) on ``cluster``, and compare it per request with the simulator.

    Cross-fitted: the requests are split into ``num_folds`` folds (by index); each fold's
    simulated timings come from overheads fitted to the other folds' requests only, so no
    request's own outcome informs its prediction. The replay is one run, so fitted and held-out
    requests saw the same machine (back-to-back replays on a shared machine differ more than
    the goal). The cluster should be idle and freshly started: its cache hits are compared
    with the simulator's, which starts empty.

    With ``repeat_replay``, the trace is replayed a second time (other tokens, same structure)
    and compared with the first as if it were a prediction (variant "real_repeat"): the error
    that run-to-run noise alone leaves, which no simulator can go below.
    """
    if not isinstance(cluster, Cluster):
        raise ValueError(f"cluster: expected a Cluster, got {cluster!r}")
    if not isinstance(goal, (int, float)) or not goal > 0:
        raise ValueError(f"goal: expected a relative error > 0, got {goal!r}")
    if not isinstance(num_folds, int) or not 2 <= num_folds <= trace.num_rows:
        raise ValueError(
            f"num_folds: expected an integer in [2, {trace.num_rows}] (requests), got {num_folds!r}"
        )
    config = cluster.config
    engine_config = config.engine
    model = read_model_config(resolve_model_path(engine_config.model))
    max_model_len = min(
        engine_config.scheduler.max_model_len or model.max_position_embeddings,
        model.max_position_embeddings,
    )
    engine_trace = trace_in_engine_blocks(trace, cluster.block_size, max_model_len)

    steps = measure_engine_steps_like_instances(engine_config, step_plan, config.instance_num_cpus)
    engine_model = steps.fit()
    fit_error = statistics.median(relative_errors(engine_model, steps.prefill, steps.decode))
    bandwidth = measure_transfer_bandwidth(engine_config)
    engine_timer = CalibratedStepTimer(
        engine=engine_model, max_prefill_chunk=engine_config.scheduler.max_prefill_chunk
    )
    # NOTE: the policies predict with the engine model (the real conductor's instances fit
    # theirs from the same engine at start-up); the step timer decides what steps take.
    sim_config = simulation_config_for(cluster, engine_model, engine_timer, bandwidth)

    def policy() -> SchedulingPolicy:
        return scheduling_policy_from_config(config.scheduling)

    replayed = replay_on_cluster(cluster, engine_trace, model.vocab_size, seed)
    n = len(replayed)
    folds = [[i for i in range(n) if i % num_folds == k] for k in range(num_folds)]
    fold_overheads = [
        fit_overheads(
            replayed,
            engine_trace,
            sim_config,
            engine_timer,
            policy,
            fit_indices=[i for i in range(n) if i % num_folds != k],
        )
        for k in range(num_folds)
    ]

    def held_out(
        make_timer: Callable[[ClusterOverheads], CalibratedStepTimer], num_draws: int = 1
    ) -> pa.Table:
        """Each request's simulated row from the runs whose overheads did not see it; with
        ``num_draws`` seeded runs, its timings are their medians (a point prediction from a
        simulator with random step times: the median minimises the expected absolute miss)."""
        rows: list[dict] = [{} for _ in range(n)]
        for fold, overheads in zip(folds, fold_overheads, strict=True):
            draws = []
            for draw in range(num_draws):
                timer = replace(make_timer(overheads), seed=seed + draw)
                result = simulate_as_driver(
                    engine_trace,
                    policy(),
                    replace(sim_config, step_timer=timer),
                    timer.overheads.handoff_s,
                )
                draws.append(result.requests.to_pylist())
            for i in fold:
                rows[i] = dict(draws[0][i])
                for _, name in COMPARED_METRICS:
                    rows[i][name] = statistics.median(d[i][name] for d in draws)
        return pa.Table.from_pylist(rows)

    variants = {
        "calibrated": held_out(lambda o: replace(engine_timer, overheads=o), SIMULATION_DRAWS),
        # The same without the interval spread: every step takes its mean.
        "no_jitter": held_out(
            lambda o: replace(engine_timer, overheads=replace(o, decode_interval_ratios=()))
        ),
        # Engine step costs alone (the hand-off too is an overhead left out).
        "engine_only": held_out(lambda o: engine_timer),
    }
    requests: pa.Table | None = None
    comparisons: list[MetricComparison] = []
    for variant, simulated in variants.items():
        paired = paired_requests(replayed, simulated)
        comparisons += compare_metrics(paired, variant)
        if requests is None:
            requests = paired
        else:
            for _, name in COMPARED_METRICS:
                requests = requests.append_column(f"{variant}_sim_{name}", paired[f"sim_{name}"])
    assert requests is not None
    if repeat_replay:
        again = replay_on_cluster(cluster, engine_trace, model.vocab_size, seed + 7919)
        comparisons += compare_metrics(
            paired_requests(replayed, as_simulated(again)), "real_repeat"
        )
    # The twin to reuse: overheads fitted to every request.
    overheads = fit_overheads(replayed, engine_trace, sim_config, engine_timer, policy)
    return CalibrationReport(
        engine_cost_model=engine_model,
        step_fit_median_rel_error=fit_error,
        step_measurements=steps,
        transfer_bandwidth_bytes_per_s=bandwidth,
        overheads=overheads,
        fold_overheads=fold_overheads,
        sim_config=replace(
            sim_config, step_timer=replace(engine_timer, overheads=overheads, seed=seed)
        ),
        requests=requests,
        comparisons=comparisons,
        goal=goal,
    )
