"""Where a decode step's time goes: host phases timed around the engine's own calls, and the
model's forward split by operator family with torch.profiler.

    python -m benchmarks.step_profile [--dtypes bfloat16 float32] [--concurrency 1 32]
        [--compile-decode]

Each row is one (dtype, batch) run of the benchmark workload (held-out 128-token prompts, 128
new tokens, greedy, EOS ignored, prefix caching off): ms per step for the scheduler, input
preparation, the forward, sampling and the rest of the engine's step (detokenizing, stop
checks, outputs), and within the forward the share of its operator time spent in matmuls,
attention (context gathers, cache writes, SDPA, raycake's attention kernel), norms and
other small ops. The timers wrap the engine's methods from outside (nothing in raycake
changes to be measured), in one run; the operator split comes from a second run under the
profiler. The phases add up to the step, the baseline they are shares of.

``--compile-decode`` profiles the engine with its compiled decode graph: the forward phase is
then the graph's call (and the K/V write after it); inside the graph norms and the small ops
are fused loops, so their time counts as "other ops"; the linears (oneDNN calls) and, on CPU,
attention (the C++ kernel) are calls out of the graph and keep their families.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import held_out_prompts, machine_columns, print_table, write_table
from raycake import LLM, SamplingParams
from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig

# Operator families by the profiler's operator names (self time, so nothing counts twice).
FAMILIES = {
    "matmul": (
        "mkldnn::_linear_pointwise",
        "raycake_cpu::small_batch_linear",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
    ),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::index_select",
        "aten::_index_put_impl_",
        "raycake_cpu::paged_decode_attention",
    ),
    "norm": ("aten::_fused_rms_norm", "aten::pow", "aten::mean", "aten::rsqrt", "aten::div_"),
}


def family(op: str) -> str:
    for name, ops in FAMILIES.items():
        if op in ops:
            return name
    return "other_ops"


class PhaseTimer:
    """Wraps methods of live objects with perf_counter timers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, method: str, phase: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, method, timed)


def profile_run(
    dtype: str, batch: int, new_tokens: int, prompt_tokens: int, compile_decode: bool = False
) -> dict:
    config = EngineConfig(
        dtype=dtype,
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(batch, 1)),
        compile_decode=compile_decode,
    )
    llm = LLM(config=config)
    engine = llm.engine
    prompts = held_out_prompts(llm.tokenizer, batch, prompt_tokens)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # warm up

    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "prepare", "prepare")
    timer.wrap(engine.runner.model, "forward", "forward")
    if compile_decode:
        timer.wrap(engine.runner, "_prepare_compiled_decode", "prepare")
        timer.wrap(engine.runner, "compiled_decode", "forward")
    timer.wrap(engine.runner, "_sample", "sample")
    timer.wrap(engine, "step", "step")
    start = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - start
    phases = dict(timer.seconds)
    # A second run under the profiler for the operator split (it slows every op a little).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ops[family(event.key)] += event.self_cpu_time_total / 1e6
    steps = new_tokens  # one prefill step makes the first token, then one decode step each
    sec = phases
    row = {
        "dtype": dtype,
        "concurrency": batch,
        "compile_decode": compile_decode,
        "tok_s": batch * new_tokens / wall,
        "step_ms": 1e3 * sec["step"] / steps,
        "schedule_ms": 1e3 * sec["schedule"] / steps,
        "prepare_ms": 1e3 * sec["prepare"] / steps,
        "forward_ms": 1e3 * sec["forward"] / steps,
        "sample_ms": 1e3 * sec["sample"] / steps,
    }
    row["engine_rest_ms"] = row["step_ms"] - sum(
        row[k] for k in ("schedule_ms", "prepare_ms", "forward_ms", "sample_ms")
    )
    op_total = sum(ops.values())
    for name in (*FAMILIES, "other_ops"):
        row[f"{name}_share"] = ops[name] / op_total if op_total else 0.0
    return row | machine_columns()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--compile-decode", action="store_true", help="the engine with EngineConfig.compile_decode"
    )
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.threads < 1 or args.new_tokens < 2:
        parser.error("--concurrency and --threads: integers >= 1; --new-tokens: >= 2")
    torch.set_num_threads(args.threads)
    rows = [
        profile_run(dtype, n, args.new_tokens, args.prompt_tokens, args.compile_decode)
        for dtype in args.dtypes
        for n in args.concurrency
    ]
    columns = ["dtype", "concurrency", "tok_s", "step_ms", "schedule_ms", "prepare_ms"]
    columns += ["forward_ms", "sample_ms", "engine_rest_ms"]
    print_table(rows, columns)
    print()
    print("operator time by family (all ops of the run, self time):")
    print_table(rows, ["dtype", "concurrency", *(f"{f}_share" for f in (*FAMILIES, "other_ops"))])
    print(f"saved {write_table(rows, 'step_profile')}")


if __name__ == "__main__":
    main()
