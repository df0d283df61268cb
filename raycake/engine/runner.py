"""One model step over a flattened batch: ``SchedulerOutput`` in, ``RunnerOutput`` out.

The runner keeps its own copy of each request's tokens and block table, updated from the
scheduler's deltas, so it can run in another process than the scheduler.

Legend: T tokens in the step, D one-token decodes, L longest decode context,
S cache slots (num_blocks x block_size), K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from raycake.engine.config import CacheConfig
from raycake.engine.memory_state import MemoryStateInputs, MemoryStatePool, SpanMemory
from raycake.engine.sampler import SampleError, sample_rows
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.step_contract import RunnerOutput, SchedulerOutput
from raycake.kernels import cpu_kernels
from raycake.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    QuerySpan,
    decode_group_bounds,
    window_mask,
)
from raycake.model.config import ModelConfig
from raycake.model.decode_graph import CompiledDecode
from raycake.model.llama import LlamaForCausalLM

# The compiled decode pads every context to the step's longest: past this many times the
# blocks the decodes hold, the eager path (decodes grouped by length) runs the step instead.
MAX_COMPILED_PADDING = 2


@dataclass
class RunnerRequestState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator
    memory_slot: int | None = None  # Titans: the slot of its memory state


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] index into T of each sampling request's last token
    sample_request_ids: list[str]
    span_request_ids: list[str]  # the request of each of ``meta.spans``
    memory: MemoryStateInputs | None = None  # Titans: which tokens update which state


class ChunkInputs(NamedTuple):
    """One span of a step. NOTE: token i of the span always goes to slot num_computed + i."""

    token_ids: list[int]  # [n]
    positions: list[int]  # [n] RoPE positions (a draft tree's differ from its slots)
    mask: torch.Tensor | None  # [n, C] additive, C = num_computed + n; None: plain causal
    samples: bool  # whether the span's last token samples the request's next token


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.kv_size * element


def num_blocks_for(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """The pool size: ``cache.num_blocks`` if set, else as many as ``kv_cache_memory_bytes`` holds."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    blocks = cache.kv_cache_memory_bytes // kv_cache_bytes_per_block(
        config, cache.block_size, dtype
    )
    if blocks < 1:
        raise ValueError(
            f"cache.kv_cache_memory_bytes: {cache.kv_cache_memory_bytes} bytes hold no block of "
            f"{cache.block_size} tokens for this model"
        )
    return int(blocks)


def _additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, -inf where ``blocked`` (on ``blocked``'s device): CPU SDPA
    runs faster on a float mask than on a boolean one."""
    zeros = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return zeros.masked_fill_(blocked, float("-inf"))


def _is_decode(state: RunnerRequestState, num_tokens: int) -> bool:
    """A decode is the one token after a sequence's computed ones; a 1-token prefill chunk in
    the middle of a prompt is not, and must not sample."""
    return (
        num_tokens == 1
        and state.num_computed_tokens > 0
        and state.num_computed_tokens + 1 == len(state.token_ids)
    )


def reseed(state: RunnerRequestState) -> None:
    """NOTE: a seeded draw depends only on (seed, sequence length), so the output is the same
    whatever the batch, and after a handoff from a prefill instance."""
    seed = state.sampling_params.seed
    if seed is not None and not state.sampling_params.is_greedy:
        state.generator.manual_seed((seed * 6364136223846793005 + len(state.token_ids)) % 2**63)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        num_blocks: int,
        seed: int = 0,
        num_memory_slots: int = 0,
        compiled_decode: CompiledDecode | None = None,
    ) -> None:
        config = model.config
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        num_slots = num_blocks * block_size
        # One tensor per layer: [2 (K, V), S, K, Dh].
        self.kv_caches = [
            torch.zeros(
                2,
                num_slots,
                config.num_key_value_heads,
                config.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
            for _ in range(config.num_hidden_layers)
        ]
        # Titans: attention sees a sliding window of the paged KV (only the window's blocks are
        # gathered), and every sequence's memory state lives in the pool.
        self.sliding_window: int | None = None
        self.memory_pool: MemoryStatePool | None = None
        if config.titans is not None:
            self.sliding_window = config.titans.sliding_window
            self.memory_pool = MemoryStatePool(
                model.memories(), num_memory_slots, self.device, self.dtype
            )
        # Eager decode groups attend in raycake's CPU kernel where it serves (not with a
        # sliding window or Titans' persistent tokens): 4-9x faster than gather + SDPA.
        self.decode_kernel = (
            config.titans is None
            and cpu_kernels.attention_unsupported_reason(config.head_dim, self.dtype, self.device)
            is None
        )
        # Steps of decodes only run through this compiled graph when set (see ``decode_graph``).
        self.compiled_decode = compiled_decode
        if compiled_decode is not None:
            compiled_decode.warm_up(self.kv_caches)
        self.requests: dict[str, RunnerRequestState] = {}
        # Requests without a seed still draw reproducibly: from generators seeded in arrival order.
        self._seed_source = torch.Generator().manual_seed(seed)

    def _generator(self, params: SamplingParams) -> torch.Generator:
        seed = params.seed
        if seed is None:
            source = self._seed_source
            seed = int(torch.randint(0, 2**62, (1,), generator=source, device=source.device))
        return torch.Generator(device=self.device).manual_seed(seed)

    def _apply_deltas(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids | out.preempted_request_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self.requests[new.request_id] = RunnerRequestState(
                token_ids=list(new.token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling_params=new.sampling_params,
                generator=self._generator(new.sampling_params),
                memory_slot=new.memory_slot,
            )
            if self.memory_pool is not None:
                if new.memory_slot is None:
                    raise ValueError(f"request {new.request_id!r}: no memory slot for Titans")
                if new.memory_source_slot is not None:
                    self.memory_pool.copy(new.memory_source_slot, new.memory_slot)
                elif new.num_computed_tokens == 0:
                    self.memory_pool.reset(new.memory_slot)
                # else: imported with its state, written by the engine already
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Flatten the step: decodes first (batched attention), then one span per prefill chunk."""
        bs = self.block_size
        decodes: list[tuple[str, RunnerRequestState]] = []
        chunks: list[tuple[str, RunnerRequestState, int]] = []
        for rid, n in out.num_scheduled_tokens.items():
            state = self.requests[rid]
            if _is_decode(state, n):
                decodes.append((rid, state))
            else:
                chunks.append((rid, state, n))

        # Built as Python lists and turned into one tensor each: many tiny tensors cost more.
        # NOTE: every tensor is built on the model's device: a mask or index left on the CPU
        # would fail (or copy every step) once the model runs on an accelerator.
        device = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        sample_ids: list[str] = []
        decode_groups: list[DecodeGroup] = []
        if decodes:
            # Shortest context first, so decodes of similar length share one attention call.
            # A window's decode gathers only the blocks that hold its window.
            lengths = [s.num_computed_tokens + 1 for _, s in decodes]
            firsts = [self._first_block(n - 1) for n in lengths]
            counts = [-(-n // bs) - f for n, f in zip(lengths, firsts, strict=True)]
            order = sorted(range(len(decodes)), key=counts.__getitem__)
            decodes = [decodes[i] for i in order]
            lengths = [lengths[i] for i in order]
            firsts = [firsts[i] for i in order]
            counts = [counts[i] for i in order]
            for i, (rid, s) in enumerate(decodes):
                pos = s.num_computed_tokens
                input_ids.append(s.token_ids[pos])
                positions.append(pos)
                slots.append(s.block_ids[pos // bs] * bs + pos % bs)
                sample_indices.append(i)
                sample_ids.append(rid)
            for start, end in decode_group_bounds(counts):
                decode_groups.append(
                    self._decode_group(decodes, lengths, firsts, counts, start, end)
                )

        spans: list[QuerySpan] = []
        for rid, s, n in chunks:
            chunk = self._chunk_inputs(rid, s, n)
            n = len(chunk.token_ids)  # a draft tree may use fewer slots than scheduled
            first = len(input_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(chunk.positions)
            table = s.block_ids
            start_slot = s.num_computed_tokens
            slots.extend(table[i // bs] * bs + i % bs for i in range(start_slot, start_slot + n))
            end_slot = start_slot + n  # the span's context: slots 0..end_slot-1
            # A window's span reads from the block holding its first query's window.
            first_block = self._first_block(start_slot)
            block_ids = torch.tensor(
                table[first_block : -(-end_slot // bs)], dtype=torch.long, device=device
            )
            mask = chunk.mask
            if self.sliding_window is not None:
                mask = window_mask(
                    torch.arange(start_slot, end_slot, device=device),
                    torch.arange(first_block * bs, end_slot, device=device),
                    self.sliding_window,
                    self.dtype,
                )
            spans.append(QuerySpan(first, first + n, block_ids, end_slot - first_block * bs, mask))
            if chunk.samples:
                sample_indices.append(first + n - 1)
                sample_ids.append(rid)

        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(decodes),
            decode_groups=decode_groups,
            spans=spans,
        )
        memory = None
        if self.memory_pool is not None:
            memory = MemoryStateInputs(
                self.memory_pool,
                decode_slots=[s.memory_slot for _, s in decodes],
                decode_positions=[s.num_computed_tokens for _, s in decodes],
                spans=[
                    SpanMemory(span.start, span.end, s.memory_slot, s.num_computed_tokens)
                    for span, (_, s, _) in zip(spans, chunks, strict=True)
                ],
            )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            meta=meta,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
            sample_request_ids=sample_ids,
            span_request_ids=[rid for rid, _, _ in chunks],
            memory=memory,
        )

    def _prepare_compiled_decode(
        self, out: SchedulerOutput
    ) -> tuple[StepInputs, torch.Tensor, torch.Tensor] | None:
        """The compiled graph's inputs when it runs this step, else None: it runs steps of
        decodes only, whose contexts pad to at most ``MAX_COMPILED_PADDING`` times their blocks
        (the eager path groups decodes by length instead)."""
        if self.compiled_decode is None or not out.num_scheduled_tokens:
            return None
        rids = list(out.num_scheduled_tokens)
        states = [self.requests[rid] for rid in rids]
        scheduled = out.num_scheduled_tokens.values()
        if not all(_is_decode(s, n) for s, n in zip(states, scheduled, strict=True)):
            return None
        bs = self.block_size
        counts = [-(-(s.num_computed_tokens + 1) // bs) for s in states]
        max_blocks = max(counts)
        if max_blocks * len(states) > MAX_COMPILED_PADDING * sum(counts):
            return None
        input_ids, positions, slots, tables = [], [], [], []
        for state in states:
            pos = state.num_computed_tokens
            input_ids.append(state.token_ids[pos])
            positions.append(pos)
            slots.append(state.block_ids[pos // bs] * bs + pos % bs)
            table = state.block_ids[:max_blocks]
            tables.append(table + [0] * (max_blocks - len(table)))
        device = self.device
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(states),
            decode_groups=[],
            spans=[],
        )
        inputs = StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            meta=meta,
            sample_indices=torch.arange(len(states), device=device),
            sample_request_ids=rids,
            span_request_ids=[],
        )
        block_tables = torch.tensor(tables, dtype=torch.long, device=device)
        context_lens = torch.tensor(positions, dtype=torch.long, device=device) + 1
        return inputs, block_tables, context_lens

    def _decode_group(
        self,
        decodes: list[tuple[str, RunnerRequestState]],
        lengths: list[int],
        firsts: list[int],
        counts: list[int],
        start: int,
        end: int,
    ) -> DecodeGroup:
        """Block tables of decodes ``start:end`` (sorted by block count), and their context
        lengths for the attention kernel or else their padding mask for SDPA."""
        bs, device = self.block_size, self.device
        max_blocks = counts[end - 1]
        rows = []
        for i in range(start, end):
            row = decodes[i][1].block_ids[firsts[i] : firsts[i] + max_blocks]
            rows.append(row + [0] * (max_blocks - len(row)))
        tables = torch.tensor(rows, dtype=torch.long, device=device)  # [d, M]
        ends = torch.tensor(lengths[start:end], device=device)
        if self.decode_kernel:
            return DecodeGroup(start, end, tables, None, ends)
        context = torch.arange(max_blocks * bs, device=device)
        if self.sliding_window is None:
            blocked = context[None, :] >= ends[:, None]  # [d, M * P] padding
        else:
            starts = torch.tensor(firsts[start:end], device=device) * bs
            key_pos = starts[:, None] + context[None, :]  # [d, M * P]
            blocked = (key_pos >= ends[:, None]) | (key_pos < ends[:, None] - self.sliding_window)
        mask = _additive_mask(blocked, self.dtype)[:, None, None, :]  # [d, 1, 1, M * P]
        return DecodeGroup(start, end, tables, mask)

    def _first_block(self, first_query: int) -> int:
        """The first block a query at position ``first_query`` (or later) attends."""
        if self.sliding_window is None:
            return 0
        return max(0, first_query - self.sliding_window + 1) // self.block_size

    def _chunk_inputs(self, rid: str, state: RunnerRequestState, n: int) -> ChunkInputs:
        """The ``n`` tokens after a request's computed ones, in slots ``num_computed + i``."""
        start_pos = state.num_computed_tokens
        end_pos = start_pos + n
        mask = None
        if start_pos > 0:
            q_pos = torch.arange(start_pos, end_pos, device=self.device)[:, None]
            cols = torch.arange(end_pos, device=self.device)[None, :]
            mask = _additive_mask(cols > q_pos, self.dtype)  # [n, C]
        return ChunkInputs(
            token_ids=state.token_ids[start_pos:end_pos],
            positions=list(range(start_pos, end_pos)),
            mask=mask,
            samples=end_pos == len(state.token_ids),
        )

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy blocks out of the cache: [layers, 2, len(block_ids), P, K, Dh]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        first = self._blocks(self.kv_caches[0])
        # Each layer's blocks are gathered straight into their slice of one tensor: one copy of
        # the blocks, not a gather and then a stack (this tensor is what a KV hand-off ships).
        out = torch.empty(
            (len(self.kv_caches), 2, len(block_ids), *first.shape[2:]),
            dtype=first.dtype,
            device=first.device,
        )
        for layer, cache in enumerate(self.kv_caches):
            torch.index_select(self._blocks(cache), 1, index, out=out[layer])
        return out

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Fill blocks from a [layers, 2, len(block_ids), P, K, Dh] tensor (``read_blocks``'s)."""
        expected = (
            len(self.kv_caches),
            2,
            len(block_ids),
            *self._blocks(self.kv_caches[0]).shape[2:],
        )
        if tuple(kv.shape) != expected:
            raise ValueError(f"kv: expected shape {expected}, got {tuple(kv.shape)}")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        kv = kv.to(device=self.device, dtype=self.dtype)
        for layer, cache in enumerate(self.kv_caches):
            self._blocks(cache).index_copy_(1, index, kv[layer])

    def _blocks(self, cache: torch.Tensor) -> torch.Tensor:
        # [2, S, K, Dh] -> [2, N, P, K, Dh]
        return cache.view(2, self.num_blocks, self.block_size, *cache.shape[2:])

    @torch.inference_mode()
    def run_model(self, out: SchedulerOutput) -> tuple[StepInputs, torch.Tensor]:
        """Apply the step's deltas and run the model over its tokens: final hidden states [T, E]."""
        self._apply_deltas(out)
        compiled = self._prepare_compiled_decode(out)
        if compiled is not None:
            inputs, block_tables, context_lens = compiled
            assert self.compiled_decode is not None
            hidden = self.compiled_decode(
                inputs.input_ids,
                inputs.positions,
                inputs.meta.slot_mapping,
                block_tables,
                context_lens,
                self.kv_caches,
            )
            for rid in inputs.sample_request_ids:
                self.requests[rid].num_computed_tokens += 1
            return inputs, hidden
        inputs = self.prepare(out)
        if inputs.memory is not None:
            hidden = self.model(
                inputs.input_ids,
                inputs.positions,
                inputs.meta,
                self.kv_caches,
                memory=inputs.memory,
            )
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        for rid, n in out.num_scheduled_tokens.items():
            self.requests[rid].num_computed_tokens += n
        return inputs, hidden

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.is_empty:
            self._apply_deltas(out)
            return RunnerOutput(sampled_token_ids={})
        inputs, hidden = self.run_model(out)
        sampled, errors = self._sample(inputs, hidden)
        return RunnerOutput(sampled_token_ids=sampled, errors=errors)

    def forget(self, request_ids: set[str]) -> None:
        """Drop the state of requests the scheduler no longer runs. The engine calls it after a
        step that raised, which may have stopped before ``_apply_deltas`` dropped them."""
        for rid in request_ids:
            self.requests.pop(rid, None)

    def _sample(
        self, inputs: StepInputs, hidden: torch.Tensor
    ) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Sample one token for each request whose span reached its end and append it; a
        request whose row fails gets an error instead (and no token)."""
        if not inputs.sample_request_ids:
            return {}, {}
        logits = self.model.compute_logits(hidden[inputs.sample_indices])  # [N, V]
        states = [self.requests[rid] for rid in inputs.sample_request_ids]
        for state in states:
            reseed(state)
        tokens = sample_rows(
            logits, [s.sampling_params for s in states], [s.generator for s in states]
        )
        sampled: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        for rid, state, token in zip(inputs.sample_request_ids, states, tokens, strict=True):
            if isinstance(token, SampleError):
                errors[rid] = token.message
            else:
                state.token_ids.append(token)
                sampled[rid] = [token]
        return sampled, errors
