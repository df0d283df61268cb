"""The offline Python API, in the shape vLLM users know: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.llm_engine import LLMEngine
from raycake.engine.request_output import RequestOutput, StreamDelta
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.spec.config import SpeculativeConfig

Prompt = str | list[int]


class LLM:
    """A single serving instance in this process.

    >>> llm = LLM()  # the embedded default model
    >>> out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=32))
    >>> print(out[0].text)
    """

    def __init__(
        self,
        model: str = "default",
        *,
        dtype: str = "float32",
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        quantization: str | None = None,
        speculative: SpeculativeConfig | dict | None = None,
        compile_decode: bool = False,
        config: EngineConfig | None = None,
    ) -> None:
        if isinstance(speculative, dict):
            speculative = SpeculativeConfig(**speculative)
        if config is None:
            config = EngineConfig(
                model=model,
                dtype=dtype,
                seed=seed,
                cache=CacheConfig(
                    block_size=block_size,
                    num_blocks=num_kv_blocks,
                    enable_prefix_caching=enable_prefix_caching,
                ),
                scheduler=SchedulerConfig(
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    max_model_len=max_model_len,
                ),
                quantization=quantization,
                speculative=speculative,
                compile_decode=compile_decode,
            )
        self.engine = LLMEngine(config)
        self.expert_shards = None  # ExpertShards when the experts run in Ray actors
        if config.moe.num_expert_shards:
            # MoE experts in ExpertShard actors (needs Ray, so imported only then).
            from raycake.actors.expert_shard import enable_expert_parallelism

            self.expert_shards = enable_expert_parallelism(self.engine)

    def close(self) -> None:
        """Stop the expert-shard actors, if any (a compiled graph's channels busy-wait)."""
        if self.expert_shards is not None:
            self.expert_shards.close()
            self.expert_shards = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt concurrently (continuous batching); outputs in the prompts' order.

        Every prompt is checked before any is queued: a bad one raises and leaves nothing in
        the engine. A request that fails while running ends with ``finish_reason "error"``
        and its ``error``; the others are unaffected.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        ids = self.engine.add_requests(prompt_list, params_list)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="generate", unit="req")
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                if delta.finished and progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
        return [self.engine.pop_finished(rid) for rid in ids]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[StreamDelta]:
        """Yield one request's text and tokens as they are produced."""
        rid = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        yield delta
                        if delta.finished:
                            self.engine.pop_finished(rid)
                            return
        finally:
            # A consumer that stops early must not leave the request holding KV blocks.
            if self.engine.is_unfinished(rid):
                self.engine.abort_request(rid)
                self.engine.pop_finished(rid)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            "prompts: expected a string, a list of token ids, or a non-empty list of those"
        )
    return list(prompts)


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return params
