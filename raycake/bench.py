"""``raycake bench``: an offline workload through one local engine, and what it measured.

In the shape of vLLM's ``bench throughput``: every request is queued at once and the engine
batches them continuously, so TTFT includes queueing behind the batch (an online service's
latency under load is what ``raycake demo`` measures). The report adds what a model costs to
hold (``weight_bytes``) and, for MoE models, the expert load of each MoE layer over the run.

Prompts are ``input_len`` tokens each: uniformly random token ids ("random"), or windows of
held-out standard-library source the embedded models never trained on ("corpus"). Both are
drawn from ``seed``; requests sample at ``temperature`` (0: greedy) with per-request seeds and
ignore EOS, so a run is repeatable and always produces ``output_len`` tokens per request.

With ``speculative`` set, the report adds what speculation did over the workload (mean
acceptance length, draft time share, the policy's choices, estimated speedup, per-request
spread); ``compare_plain`` also runs the same workload without speculation, in the same
process, and reports the measured speedup.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raycake.engine.config import EngineConfig, SchedulerConfig
from raycake.engine.engine_stats import moe_load_since
from raycake.engine.request_output import RequestOutput
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.tree import SpecDecodeStats
from raycake.model.config import MoEConfig
from raycake.model.int8_outliers import LayerOutliers, int8_share_overall, measure_outliers
from raycake.model.moe import MoEStats
from raycake.model.tokenizer import Tokenizer

DATASETS = ("random", "corpus")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the engine to build and the workload to put through it."""

    model: str = "default"  # checkpoint folder, "default" or "default-moe"
    dtype: str = "float32"
    seed: int = 0  # prompts, sampling and the engine
    dataset: str = "random"  # one of DATASETS
    num_prompts: int = 64
    input_len: int = 128  # prompt tokens per request
    output_len: int = 128  # generated tokens per request
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    moe: MoEConfig = field(default_factory=MoEConfig)
    quantization: str | None = None  # "int8": LLM.int8() linear layers
    temperature: float = 1.0  # 0: greedy
    speculative: SpeculativeConfig | None = None
    compare_plain: bool = False  # also run without speculation; report the measured speedup
    compile_decode: bool = False  # decode steps through the compiled graph (EngineConfig's)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < math.inf:
            raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
        if self.compare_plain and self.speculative is None:
            raise ValueError("compare_plain: needs speculative (there is nothing to compare)")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {self.dataset!r}")
        # Build the engine config once now, so bad engine fields fail before a model loads.
        _ = self.engine_config

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            seed=self.seed,
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
            ),
            moe=self.moe,
            quantization=self.quantization,
            speculative=self.speculative,
            compile_decode=self.compile_decode,
        )


@dataclass(frozen=True)
class SpecBenchStats:
    """What speculative decoding did over the workload (warm-up excluded)."""

    policy: str  # the speculation policy's name
    num_draft_tokens: int  # the configured budget (fixed) or maximum (adaptive)
    mean_acceptance_length: float  # tokens emitted per target pass of a speculating request
    acceptance_rate: float  # accepted draft tokens over verified ones
    draft_time_share: float  # draft-head seconds over all step seconds
    speculating_step_share: float  # engine steps in which the policy gave any drafts
    estimated_speedup: float  # verify steps' tokens/s over plain steps' by the fitted cost model
    # Spread of the requests' own mean acceptance lengths (requests that drafted).
    request_acceptance_p10: float | None
    request_acceptance_p50: float | None
    request_acceptance_p90: float | None
    # With compare_plain: the plain run's output tokens/s, and this run's over it.
    plain_output_tokens_per_s: float | None = None
    measured_speedup: float | None = None


@dataclass(frozen=True)
class MoELayerLoad:
    """One MoE layer's expert load over the run (see ``MoEStats``)."""

    layer: int  # decoder layer index
    tokens_per_expert: tuple[int, ...]  # (token, choice) pairs each expert ran
    assigned_per_expert: tuple[int, ...]  # pairs the router sent each expert, kept or dropped
    num_assignments: int  # (token, choice) pairs routed, kept or dropped
    num_dropped: int  # pairs dropped at expert capacity
    drop_rate: float  # num_dropped / num_assignments
    imbalance: float  # busiest expert's demand (assigned) over the mean; 1.0 is balanced
    kept_imbalance: float  # the same over the pairs the experts ran

    @classmethod
    def from_stats(cls, layer: int, stats: MoEStats) -> MoELayerLoad:
        return cls(
            layer=layer,
            tokens_per_expert=tuple(stats.tokens_per_expert),
            assigned_per_expert=tuple(stats.assigned_per_expert),
            num_assignments=stats.num_assignments,
            num_dropped=stats.num_dropped,
            drop_rate=stats.drop_rate,
            imbalance=stats.imbalance,
            kept_imbalance=stats.kept_imbalance,
        )


@dataclass(frozen=True)
class BenchReport:
    """What one run measured; ``to_json`` is the ``--json`` / ``--output`` form."""

    config: BenchConfig
    model_dir: str  # the checkpoint folder ``config.model`` resolved to
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float  # first request queued to last request finished
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt and output tokens
    # Latency percentiles in ms; None when there is nothing to measure (TBT with output_len 1).
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    tbt_p50_ms: float | None
    tbt_p90_ms: float | None
    weight_bytes: int  # see ``weight_bytes``
    router: str | None  # the MoE layers' routing policy; None for a dense model
    moe_layers: tuple[MoELayerLoad, ...] = ()  # empty for a dense model
    spec: SpecBenchStats | None = None  # None without speculation
    # quantization "int8": where LLM.int8() runs in int8, per layer, on held-out text.
    int8_layers: tuple[LayerOutliers, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_text(self) -> str:
        c = self.config
        model = c.model if c.model == self.model_dir else f"{c.model} ({self.model_dir})"
        lines = [
            f"model {model}, {c.dtype}{', int8 weights' if c.quantization else ''}; {c.num_prompts} {c.dataset} prompts of {c.input_len} "
            f"tokens, {c.output_len} out; max_num_seqs {c.max_num_seqs}",
            f"requests        {self.num_requests}",
            f"prompt tokens   {self.prompt_tokens:,}",
            f"output tokens   {self.output_tokens:,}",
            f"elapsed         {self.elapsed_s:.2f} s",
            f"throughput      {self.requests_per_s:.2f} requests/s, "
            f"{self.output_tokens_per_s:.1f} output tokens/s, "
            f"{self.total_tokens_per_s:.1f} total tokens/s",
            f"TTFT ms         p50 {_ms(self.ttft_p50_ms)}  p90 {_ms(self.ttft_p90_ms)}",
            f"TBT ms          p50 {_ms(self.tbt_p50_ms)}  p90 {_ms(self.tbt_p90_ms)}",
            f"weight memory   {self.weight_bytes:,} bytes ({self.weight_bytes / 2**20:.1f} MiB)"
            + (
                f" here; experts in {c.moe.num_expert_shards} shard actors not counted"
                if c.moe.num_expert_shards and self.moe_layers
                else ""
            ),
        ]
        if self.moe_layers:
            capacity = c.moe.capacity_factor
            lines += [
                "",
                f"MoE expert load over the run: router {self.router}, capacity factor "
                f"{'none (dropless)' if capacity is None else capacity}",
                "(imbalance: busiest expert over the mean, 1.00 is balanced, of the router's "
                "choices; kept: of the tokens the experts ran, after drops at capacity)",
                "layer  drop rate  imbalance  kept imbalance  tokens per expert (kept)",
            ]
            for load in self.moe_layers:
                tokens = " ".join(str(n) for n in load.tokens_per_expert)
                lines.append(
                    f"{load.layer:>5}  {load.drop_rate:>9.2%}  {load.imbalance:>9.2f}  "
                    f"{load.kept_imbalance:>14.2f}  {tokens}"
                )
        if self.int8_layers:
            lines += ["", *_int8_lines(self.int8_layers)]
        if self.spec is not None:
            sp, spec_config = self.spec, c.speculative
            assert spec_config is not None
            lines += [
                "",
                f"speculative decoding: {spec_config.method}, policy {sp.policy} "
                f"(up to {sp.num_draft_tokens} draft tokens, depth {spec_config.max_depth}, "
                f"top-k {spec_config.tree_top_k})",
                f"acceptance      {sp.mean_acceptance_length:.2f} tokens per target pass "
                f"({sp.acceptance_rate:.1%} of draft tokens accepted); per request p10 "
                f"{_num(sp.request_acceptance_p10)}  p50 {_num(sp.request_acceptance_p50)}  "
                f"p90 {_num(sp.request_acceptance_p90)}",
                f"draft time      {sp.draft_time_share:.1%} of step time; the policy drafted in "
                f"{sp.speculating_step_share:.1%} of steps",
                f"speedup         {sp.estimated_speedup:.2f}x estimated (plain steps by the "
                "fitted cost model)"
                + (
                    ""
                    if sp.measured_speedup is None
                    else f"; {sp.measured_speedup:.2f}x measured against a plain run "
                    f"({sp.plain_output_tokens_per_s:.1f} output tokens/s)"
                ),
            ]
        return "\n".join(lines)


def _int8_lines(layers: tuple[LayerOutliers, ...]) -> list[str]:
    lines = [
        f"LLM.int8() on {INT8_WINDOWS} held-out windows of {INT8_WINDOW_TOKENS} tokens "
        f"(threshold {layers[0].threshold:g}): int8 share of multiply-adds "
        f"{int8_share_overall(list(layers)):.1%} for a call of one window (prefill), "
        f"{int8_share_overall(list(layers), 'token'):.1%} for one token (decode)",
        f"{'layer':<36} {'K':>5} {'int8/window':>11} {'int8/token':>10} "
        f"{'outlier cols':>12} {'systematic':>10}",
    ]
    for layer in layers:
        lines.append(
            f"{layer.name:<36} {layer.in_features:>5} {layer.int8_share_window:>11.1%} "
            f"{layer.int8_share_token:>10.2%} {layer.outlier_columns_any:>12} "
            f"{layer.systematic_columns:>10}"
        )
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take as loaded: every parameter and persistent buffer (what a
    checkpoint of it holds, e.g. quantized weights and their scales), a tensor shared by
    several modules (tied embeddings) counted once. Experts moved to expert-shard actors are
    not in the model, so not counted."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():  # the tensors themselves
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolating between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# The int8 report's held-out text: this many windows of this many tokens.
INT8_WINDOWS = 8
INT8_WINDOW_TOKENS = 256


def random_prompts(
    rng: random.Random, vocab_size: int, num_prompts: int, input_len: int
) -> list[list[int]]:
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def corpus_prompts(
    rng: random.Random, tokenizer: Tokenizer, num_prompts: int, input_len: int
) -> list[list[int]]:
    """Windows of ``input_len`` tokens at random places in held-out standard-library files."""
    from raycake.training.corpus import read_texts, split_corpus

    sources = [
        ids
        for ids in (
            tokenizer.encode(t, add_special_tokens=False)
            for t in read_texts(split_corpus().held_out)
        )
        if len(ids) >= input_len
    ]
    if not sources:
        raise ValueError(f"input_len: no held-out corpus file has {input_len} tokens")
    prompts = []
    for _ in range(num_prompts):
        ids = rng.choice(sources)
        start = rng.randrange(len(ids) - input_len + 1)
        prompts.append(ids[start : start + input_len])
    return prompts


def run_bench(config: BenchConfig, progress: bool = False) -> BenchReport:
    """Build the engine, put the workload through it once, and report (with ``compare_plain``,
    then the same workload on an engine without speculation)."""
    from raycake.llm import LLM

    with LLM(config=config.engine_config) as llm:  # closes expert shards, if any
        report = _run(llm, config, progress)
    if not config.compare_plain or report.spec is None:
        return report
    plain_config = dataclasses.replace(config, speculative=None, compare_plain=False)
    with LLM(config=plain_config.engine_config) as llm:
        plain = _run(llm, plain_config, progress)
    spec = dataclasses.replace(
        report.spec,
        plain_output_tokens_per_s=plain.output_tokens_per_s,
        measured_speedup=report.output_tokens_per_s / plain.output_tokens_per_s,
    )
    return dataclasses.replace(report, spec=spec)


def _run(llm: Any, config: BenchConfig, progress: bool) -> BenchReport:
    from raycake.model.llama import router_for

    engine = llm.engine
    total_len = config.input_len + config.output_len
    if total_len > engine.max_model_len:
        raise ValueError(
            f"input_len + output_len: {total_len} tokens exceed the model's max_model_len "
            f"{engine.max_model_len}"
        )
    rng = random.Random(config.seed)
    if config.dataset == "random":
        vocab = engine.model_config.vocab_size
        prompts = random_prompts(rng, vocab, config.num_prompts, config.input_len)
    else:
        prompts = corpus_prompts(rng, engine.tokenizer, config.num_prompts, config.input_len)
    params = [
        SamplingParams(
            temperature=config.temperature,
            seed=config.seed + i,
            max_tokens=config.output_len,
            ignore_eos=True,
        )
        for i in range(config.num_prompts)
    ]
    # Warm-up: one short request, so one-time costs (with compile_decode, compiling the decode
    # graph) stay out of the timings. Too short to fill a KV block, it leaves nothing in the
    # prefix cache for the workload to reuse.
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))
    baseline = engine.moe_stats()
    spec_before = engine.spec_stats()
    controller = engine.spec_controller
    steps_before = (0, 0) if controller is None else _policy_steps(controller)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - started
    moe_load = moe_load_since(engine.moe_stats(), baseline)
    spec = None
    if spec_before is not None and config.speculative is not None:
        steps_after = _policy_steps(controller)
        spec = _spec_stats(
            config.speculative,
            controller.policy.name,
            engine.spec_stats().since(spec_before),
            (steps_after[0] - steps_before[0], steps_after[1] - steps_before[1]),
            outputs,
        )
    report = _report(
        config,
        str(engine.model_dir),
        outputs,
        elapsed,
        weight_bytes(engine.model),
        router_for(engine.model_config, config.moe).name if moe_load else None,
        moe_load,
    )
    int8_layers = _int8_layers(engine, config.seed) if config.quantization == "int8" else ()
    return dataclasses.replace(report, spec=spec, int8_layers=int8_layers)


def _int8_layers(engine: Any, seed: int) -> tuple[LayerOutliers, ...]:
    """Outlier columns of every int8 layer, measured on held-out text after the run."""
    import torch

    length = min(INT8_WINDOW_TOKENS, engine.max_model_len)
    windows = corpus_prompts(random.Random(seed), engine.tokenizer, INT8_WINDOWS, length)
    model, device = engine.model, engine.runner.device
    ids = torch.tensor(windows, dtype=torch.long, device=device)  # [W, T]
    positions = torch.arange(length, device=device)[None]  # [1, T]
    return tuple(measure_outliers(model, lambda window: model(window, positions), ids))


def _policy_steps(controller: Any) -> tuple[int, int]:
    return controller.num_steps, controller.num_speculating_steps


def _spec_stats(
    spec: SpeculativeConfig,
    policy: str,
    window: SpecDecodeStats,
    steps: tuple[int, int],
    outputs: list[RequestOutput],
) -> SpecBenchStats:
    per_request = [
        o.metrics.spec_mean_acceptance_length
        for o in outputs
        if o.metrics.spec_mean_acceptance_length is not None
    ]
    num_steps, speculating = steps
    return SpecBenchStats(
        policy=policy,
        num_draft_tokens=spec.num_draft_tokens,
        mean_acceptance_length=window.mean_acceptance_length,
        acceptance_rate=window.acceptance_rate,
        draft_time_share=window.draft_time_share,
        speculating_step_share=speculating / num_steps if num_steps else 0.0,
        estimated_speedup=window.estimated_speedup,
        request_acceptance_p10=percentile(per_request, 10),
        request_acceptance_p50=percentile(per_request, 50),
        request_acceptance_p90=percentile(per_request, 90),
    )


def _report(
    config: BenchConfig,
    model_dir: str,
    outputs: list[RequestOutput],
    elapsed: float,
    num_weight_bytes: int,
    router: str | None,
    moe_load: dict[int, MoEStats],
) -> BenchReport:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    ttft = [1000 * o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    tbt = [1000 * gap for o in outputs for gap in o.metrics.tbt]
    return BenchReport(
        config=config,
        model_dir=model_dir,
        num_requests=len(outputs),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        elapsed_s=elapsed,
        requests_per_s=len(outputs) / elapsed,
        output_tokens_per_s=output_tokens / elapsed,
        total_tokens_per_s=(prompt_tokens + output_tokens) / elapsed,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p90_ms=percentile(ttft, 90),
        tbt_p50_ms=percentile(tbt, 50),
        tbt_p90_ms=percentile(tbt, 90),
        weight_bytes=num_weight_bytes,
        router=router,
        moe_layers=tuple(MoELayerLoad.from_stats(i, s) for i, s in sorted(moe_load.items())),
    )
