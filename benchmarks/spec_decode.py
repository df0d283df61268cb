"""EAGLE speculative decoding on the embedded model: tokens/s and acceptance length of plain
decoding, a fixed chain of 4, an EAGLE tree and the adaptive policy, at batch 1, 4, 16 and 64,
all in the same run.

    python -m benchmarks.spec_decode [--batches 1 4 16 64] [--new-tokens 128] [--repeats 3]
        [--prompt-len 128] [--min-prompts 4] [--tree 12 6 4] [--threads N] [--draft-model DIR]
        [--no-prepack]

Greedy, ``new-tokens`` per request (EOS ignored), prompts are windows of held-out standard-library
source the model and its head never trained on. A batch of ``b`` is ``max(b, min-prompts)``
requests through an engine with ``max_num_seqs = b`` (so batch 1 averages over several prompts,
one at a time). Every variant's output is checked token for token against plain decoding.

Variants: ``plain`` (no speculation); ``chain4`` (fixed budget of 4 at depth 4: a chain);
``eagle_tree`` (fixed budget of ``--tree`` nodes / depth / top-k: an EAGLE-2 dynamic tree);
``adaptive`` (the goodput policy, budgets up to the tree's depth, from measured acceptance and
step costs). Each variant has its own engine, warmed by one untimed run (the adaptive policy
learns its costs there, as a serving instance would); then the variants take turns, ``repeats``
rounds, so load from other work on the machine hits them alike. Rows give the median round.

Columns: ``tok_s`` output tokens/s; ``speedup`` over plain in the same round (median);
``accept_len`` tokens emitted per target pass of a speculating request; ``draft_share`` draft-head
seconds over step seconds; ``spec_steps`` share of steps in which the policy drafted;
``drafts_per_step`` mean draft tokens the policy gave per step; ``identical`` whether every output
equals plain decoding's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import held_out_prompts, print_table, write_table
from raycake.engine.config import EngineConfig, SchedulerConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.spec.config import SpeculativeConfig

# EAGLE-1 / EAGLE-2 published numbers (NOTES-kernels.md): what the table is compared with.
PAPER = [
    ("EAGLE-1, Vicuna-7B, Spec-Bench (A100, batch 1)", "3.58", "2.10x"),
    ("EAGLE-2, Vicuna-7B, Spec-Bench (A100, batch 1)", "4.34", "2.36x"),
    ("EAGLE-1, LLaMA2-Chat 70B (paper)", "-", "2.7-3.5x"),
]


@dataclass
class Variant:
    name: str
    spec: SpeculativeConfig | None


def variants(tree: tuple[int, int, int], head: str = "default") -> list[Variant]:
    budget, depth, top_k = tree
    return [
        Variant("plain", None),
        Variant("chain4", SpeculativeConfig(draft_model=head, num_draft_tokens=4, max_depth=4)),
        Variant(
            "eagle_tree",
            SpeculativeConfig(
                draft_model=head, num_draft_tokens=budget, max_depth=depth, tree_top_k=top_k
            ),
        ),
        Variant(
            "adaptive",
            SpeculativeConfig(
                draft_model=head,
                num_draft_tokens=budget,
                max_depth=depth,
                tree_top_k=top_k,
                policy="adaptive",
            ),
        ),
    ]


@dataclass
class RunResult:
    seconds: float
    output_tokens: int
    outputs: list[list[int]]
    accept_len: float | None
    draft_share: float | None
    spec_steps: float | None
    drafts_per_step: float | None


def run_once(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> RunResult:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    spec_before = engine.spec_stats()
    controller = engine.spec_controller
    steps_before = (
        (0, 0) if controller is None else (controller.num_steps, controller.num_speculating_steps)
    )
    drafts = 0
    ids = [engine.add_request(p, params) for p in prompts]
    started = time.perf_counter()
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
        record = engine.last_step
        if record is not None:
            drafts += record.num_draft_tokens
    seconds = time.perf_counter() - started
    finished = {o.request_id: o for o in engine.pop_all_finished()}
    outputs = [finished[i].outputs[0].token_ids for i in ids]
    result = RunResult(seconds, sum(len(o) for o in outputs), outputs, None, None, None, None)
    if spec_before is not None:
        window = engine.spec_stats().since(spec_before)
        steps = controller.num_steps - steps_before[0]
        result.accept_len = window.mean_acceptance_length
        result.draft_share = window.draft_time_share
        result.spec_steps = (controller.num_speculating_steps - steps_before[1]) / max(steps, 1)
        result.drafts_per_step = drafts / max(num_steps, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--min-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tree", type=int, nargs=3, default=[12, 6, 4], metavar=("NODES", "DEPTH", "TOP_K")
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--draft-model", default="default", help="EAGLE head folder ('default': the shipped one)"
    )
    parser.add_argument(
        "--no-prepack", action="store_true", help="EngineConfig.prepack_weights=False"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for batch in args.batches:
        engines = {}
        prompts = None
        for v in variants(tuple(args.tree), args.draft_model):
            engine = LLMEngine(
                EngineConfig(
                    speculative=v.spec,
                    prepack_weights=not args.no_prepack,
                    scheduler=SchedulerConfig(
                        max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * 32)
                    ),
                )
            )
            if prompts is None:
                prompts = held_out_prompts(
                    engine.tokenizer, max(batch, args.min_prompts), args.prompt_len
                )
            run_once(engine, prompts, args.new_tokens)  # warm-up; the adaptive policy learns
            engines[v.name] = engine
        results: dict[str, list[RunResult]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                results[name].append(run_once(engine, prompts, args.new_tokens))
        plain = results["plain"]
        for name, runs in results.items():
            ratios = [p.seconds / r.seconds for p, r in zip(plain, runs, strict=True)]
            mid = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
            rows.append(
                {
                    "batch": batch,
                    "variant": name,
                    "tok_s": mid.output_tokens / mid.seconds,
                    "speedup": statistics.median(ratios),
                    "accept_len": mid.accept_len,
                    "draft_share": mid.draft_share,
                    "spec_steps": mid.spec_steps,
                    "drafts_per_step": mid.drafts_per_step,
                    "identical": all(r.outputs == plain[0].outputs for r in runs),
                }
            )
        print_table(
            [r for r in rows if r["batch"] == batch],
            [
                "batch",
                "variant",
                "tok_s",
                "speedup",
                "accept_len",
                "draft_share",
                "spec_steps",
                "drafts_per_step",
                "identical",
            ],
        )
        print(flush=True)

    path = write_table(rows, "spec_decode")
    print(f"wrote {path} (and .csv)")
    print()
    print("published, for comparison (accepted tokens per target pass, speedup):")
    for what, length, speedup in PAPER:
        print(f"  {what}: {length}, {speedup}")
    print()
    report_goals(rows)


def report_goals(rows: list[dict]) -> None:
    """The issue's goals, PASS or FAIL, from this run's rows."""

    def row(batch: int, variant: str) -> dict | None:
        return next((r for r in rows if r["batch"] == batch and r["variant"] == variant), None)

    tree1 = row(1, "eagle_tree")
    if tree1 is not None:
        ok = tree1["accept_len"] >= 3.0
        print(
            f"{'PASS' if ok else 'FAIL'}: EAGLE tree acceptance length at batch 1 "
            f"{tree1['accept_len']:.2f} (goal >= 3.0)"
        )
        best = max(
            (r for r in rows if r["batch"] == 1 and r["variant"] != "plain"),
            key=lambda r: r["speedup"],
        )
        ok = best["speedup"] >= 2.0
        print(
            f"{'PASS' if ok else 'FAIL'}: speedup at batch 1 {best['speedup']:.2f}x "
            f"({best['variant']}; EAGLE tree {tree1['speedup']:.2f}x) (goal >= 2x)"
        )
    for batch in sorted({r["batch"] for r in rows}):
        adaptive = row(batch, "adaptive")
        fixed = [
            r for r in rows if r["batch"] == batch and r["variant"] in ("chain4", "eagle_tree")
        ]
        if adaptive is None or not fixed:
            continue
        best = max(fixed, key=lambda r: r["tok_s"])
        ratio = adaptive["tok_s"] / best["tok_s"]
        ok = ratio >= 0.95
        print(
            f"{'PASS' if ok else 'FAIL'}: batch {batch}: adaptive at {ratio:.1%} of the best "
            f"fixed ({best['variant']}) (goal >= 95%); plain is at "
            f"{row(batch, 'plain')['tok_s'] / best['tok_s']:.1%}"
        )
    same = all(r["identical"] for r in rows)
    print(f"{'PASS' if same else 'FAIL'}: every output identical to plain greedy decoding")


if __name__ == "__main__":
    main()
