"""One serving instance without Ray: tokenizer, scheduler, runner and output processing.

MoE load: the engine keeps one ``MoEStats`` per MoE layer, summed over every step since it
started and never reset, like a Prometheus counter. A reader takes the load of any interval as
the difference of two reads of ``moe_stats()`` (``moe_load_since``): the instance gauges show
the last few seconds, the ``raycake bench`` report the whole measured run.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raycake.assets import resolve_draft_model
from raycake.engine.config import EngineConfig
from raycake.engine.cpu_malloc import keep_freed_memory
from raycake.engine.engine_stats import StepRecord
from raycake.engine.handoff import ExportedKV, check_memory_state, check_prefilled_kv
from raycake.engine.kv_cache import block_hashes_for, check_block_hashes
from raycake.engine.memory_state import memory_state_bytes_per_slot
from raycake.engine.request import Request, RequestStatus
from raycake.engine.request_output import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    StreamDelta,
)
from raycake.engine.runner import ModelRunner, num_blocks_for
from raycake.engine.sampling_params import SamplingParams, check_params_for_model
from raycake.engine.scheduler import DraftBudget, Scheduler
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import SpeculationController
from raycake.engine.spec.runner import SpecDecodeRunner
from raycake.engine.spec.tree import SpecDecodeStats
from raycake.engine.state_cache import MemoryStateCache
from raycake.engine.step_contract import RequestUpdate, SchedulerOutput, SchedulerStats
from raycake.model.cpu_prepack import prepack_linears
from raycake.model.decode_graph import CompiledDecode
from raycake.model.eagle import load_eagle_head
from raycake.model.loader import DTYPES, load_model, resolve_model_path
from raycake.model.moe import MoEStats
from raycake.model.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from raycake.policies.eviction import make_eviction_policy
from raycake.validation import check_token_ids, require

logger = logging.getLogger(__name__)


@dataclass
class _TrackedRequest:
    """Output-side state of a request: text so far, stop-string matching, timing."""

    prompt: str | None
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed_chars: int = 0  # how much of ``text`` has been sent as deltas
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class LLMEngine:
    """Continuous batching over one model. ``step()`` runs one scheduler/runner round."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.keep_freed_memory and torch.device(config.device).type == "cpu":
            keep_freed_memory()
        model_dir = resolve_model_path(config.model)
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model = load_model(
            model_dir,
            dtype=config.dtype,
            device=config.device,
            moe=config.moe,
            quantization=config.quantization,
            int8_threshold=config.int8_threshold,
        )
        if config.prepack_weights:
            prepack_linears(self.model, small_batch=True)
        model_config = self.model.config
        self.model_config = model_config
        self.max_model_len = min(
            config.scheduler.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
        )
        num_blocks = num_blocks_for(model_config, config.cache, DTYPES[config.dtype])
        spec = config.speculative
        memory_states, num_memory_slots = self._memory_state_cache()
        if memory_states is not None and spec is not None and spec.method is not None:
            raise ValueError(
                "speculative: not supported for Titans models (a memory state written by "
                "draft tokens cannot be rolled back when they are rejected); set it to null"
            )
        # The speculative batching policy with the acceptance and step costs it decides on.
        self.spec_controller = (
            SpeculationController.from_config(spec)
            if spec is not None and spec.method is not None
            else None
        )
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            num_blocks,
            self.max_model_len,
            draft_budget=draft_budget_for(spec, self.spec_controller),
            memory_states=memory_states,
            sliding_window=model_config.titans.sliding_window if model_config.titans else None,
        )
        self.runner: ModelRunner
        if spec is not None and spec.method == "eagle":
            head = load_eagle_head(
                resolve_draft_model(spec.draft_model), model_config, config.dtype, config.device
            )
            self.runner = SpecDecodeRunner(
                self.model,
                head,
                spec,
                config.cache.block_size,
                num_blocks,
                config.scheduler.max_num_seqs,
                seed=config.seed,
                controller=self.spec_controller,
            )
        else:
            self.runner = ModelRunner(
                self.model,
                config.cache.block_size,
                num_blocks,
                seed=config.seed,
                num_memory_slots=num_memory_slots,
                compiled_decode=(
                    CompiledDecode(self.model, config.cache.block_size)
                    if config.compile_decode
                    else None
                ),
            )
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids) or model_config.eos_token_ids
        self._tracked: dict[str, _TrackedRequest] = {}
        self._finished: dict[str, RequestOutput] = {}
        self._ids = itertools.count()
        self.last_step: StepRecord | None = None
        # Expert load per MoE layer, by decoder layer index (empty for a dense model).
        self._moe_stats = {
            i: MoEStats(model_config.num_experts)
            for i in range(model_config.num_hidden_layers)
            if model_config.is_moe_layer(i)
        }

    @property
    def model_path(self) -> Path:
        return self.model_dir

    def _memory_state_cache(self) -> tuple[MemoryStateCache | None, int]:
        """Titans: the slot manager of the memory states and how many slots the budget holds."""
        titans = self.model_config.titans
        if titans is None:
            return None, 0
        cache = self.config.cache
        per_slot = memory_state_bytes_per_slot(self.model.memories(), DTYPES[self.config.dtype])
        num_slots = cache.memory_state_bytes // per_slot
        if num_slots < 1:
            raise ValueError(
                f"cache.memory_state_bytes: {cache.memory_state_bytes} bytes hold no memory "
                f"state of this model ({per_slot} bytes per sequence)"
            )
        states = MemoryStateCache(
            num_slots,
            cache.block_size,
            titans.memory.chunk_size,
            enable_prefix_caching=cache.enable_prefix_caching,
            eviction_policy=make_eviction_policy(cache.eviction_policy),
        )
        return states, num_slots

    def add_request(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        hold_kv: bool = False,
    ) -> str:
        """Queue a prompt (text, or token ids); returns its request id.

        ``hold_kv``: keep the request's KV blocks after it finishes, for ``export_kv``, until
        ``release_kv`` (a prefill instance hands them to a decode instance). Every check runs
        before anything is queued: a bad request raises ``ValueError`` (``RequestRejected``
        when it could never fit) naming the field, or ``TypeError`` for a wrong type.
        """
        return self.add_requests([prompt], [sampling_params], [request_id], hold_kv=hold_kv)[0]

    def add_requests(
        self,
        prompts: Sequence[str | list[int]],
        sampling_params: Sequence[SamplingParams | None],
        request_ids: Sequence[str | None] | None = None,
        *,
        hold_kv: bool = False,
    ) -> list[str]:
        """Queue several prompts, all or none: every one is checked before any is queued, so a
        bad one leaves nothing behind. Returns their request ids, in order."""
        if request_ids is None:
            request_ids = [None] * len(prompts)
        if not len(prompts) == len(sampling_params) == len(request_ids):
            raise ValueError(
                f"sampling_params: got {len(sampling_params)} and request_ids "
                f"{len(request_ids)} for {len(prompts)} prompts"
            )
        prepared: list[tuple[Request, str | None]] = []
        ids: set[str] = set()
        for prompt, params, request_id in zip(prompts, sampling_params, request_ids, strict=True):
            request, text = self._prepare_request(prompt, params, request_id)
            if request.request_id in ids:
                raise ValueError(f"request_id: {request.request_id!r} appears twice")
            ids.add(request.request_id)
            request.hold_kv_on_finish = hold_kv
            prepared.append((request, text))
        for request, text in prepared:
            self.scheduler.add_request(request)  # checked above: cannot raise RequestRejected
            self._track(request, text)
        return [request.request_id for request, _ in prepared]

    def _prepare_request(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None,
        request_id: str | None,
    ) -> tuple[Request, str | None]:
        """A checked ``Request`` (not queued) and its prompt text (None for token ids)."""
        params = SamplingParams() if sampling_params is None else sampling_params
        self._check_params(params)
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            text, token_ids = None, list(prompt)
        else:
            raise TypeError(
                f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not token_ids:
            raise ValueError("prompt: expected at least one token, got a prompt of none")
        check_token_ids("prompt", token_ids, self.model_config.vocab_size)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        self._check_request_id(request_id)
        # Pure: raises RequestRejected for a request that could never fit, queues nothing.
        self.scheduler.check_admissible(request_id, len(token_ids), params.max_tokens)
        request = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids)
        return request, text

    def _check_params(self, params: object) -> None:
        check_params_for_model(params, self.model_config.vocab_size)

    def _check_request_id(self, request_id: object) -> None:
        require(
            isinstance(request_id, str) and request_id != "",
            "request_id",
            "a non-empty string",
            request_id,
        )
        if request_id in self._tracked:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        if request_id in self.scheduler.held:
            # Its blocks are still held for export under this id.
            raise ValueError(f"request_id: {request_id!r} still holds KV (call release_kv)")

    def _track(self, request: Request, prompt: str | None) -> _TrackedRequest:
        params = request.sampling_params
        tracked = _TrackedRequest(
            prompt=prompt,
            prompt_token_ids=request.prompt_token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stop_matcher=StopStringMatcher(params.stop) if params.stop else None,
            metrics=RequestMetrics(arrival_time=request.arrival_time),
        )
        self._tracked[request.request_id] = tracked
        return tracked

    # ---- disaggregation: KV leaves a prefill engine and enters a decode engine ----------------

    def prefix_block_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``token_ids`` (the KV store's keys)."""
        return block_hashes_for(token_ids, self.config.cache.block_size)

    def num_cached_prefix_blocks(self, block_hashes: list[bytes]) -> int:
        return self.scheduler.kv_cache.num_cached_prefix_blocks(block_hashes)

    def import_prefix_blocks(self, block_hashes: list[bytes], kv: torch.Tensor) -> int:
        """Put fetched full blocks ([layers, 2, n, P, K, Dh]) into the prefix cache; returns how
        many were new. Nothing is imported when the free pool cannot hold them."""
        targets = self.scheduler.kv_cache.import_cached_blocks(block_hashes)
        fill = [(i, b) for i, b in enumerate(targets) if b is not None]
        if fill:
            index = torch.tensor([i for i, _ in fill], device=kv.device)
            self.runner.write_blocks([b for _, b in fill], kv.index_select(2, index))
        return len(fill)

    def export_kv(self, request_id: str) -> ExportedKV:
        """The KV of a finished ``hold_kv`` request's prompt, with its full blocks' hashes and,
        with speculation on, the target features the EAGLE head drafts from."""
        request = self.scheduler.held.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id!r}: no held KV (not finished, or not hold_kv)")
        num_tokens = request.num_prompt_tokens
        block_size = self.config.cache.block_size
        block_ids = self.scheduler.kv_cache.block_ids(request_id)[: -(-num_tokens // block_size)]
        features = None
        if isinstance(self.runner, SpecDecodeRunner):
            features = self.runner.read_features(block_ids, num_tokens)
        memory_state = None
        if self.runner.memory_pool is not None:
            slot = self.scheduler.memory_states.slot(request_id)
            memory_state = self.runner.memory_pool.read(slot, num_tokens)
        return ExportedKV(
            kv=self.runner.read_blocks(block_ids),
            block_hashes=block_hashes_for(request.prompt_token_ids, block_size),
            num_tokens=num_tokens,
            features=features,
            memory_state=memory_state,
        )

    def release_kv(self, request_id: str) -> None:
        self.scheduler.release_held_kv(request_id)

    def export_memory_snapshot(
        self, request_id: str
    ) -> tuple[bytes, dict[str, torch.Tensor]] | None:
        """Titans: a held (``hold_kv``) request's memory state at its last memory-chunk
        boundary, by tensor name (no pending rows: a boundary has none), with the chained hash
        of the block that ends there (its key in the KV store); None for other models and for
        a sequence shorter than one chunk (the initial state needs no snapshot)."""
        request = self.scheduler.held.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id!r}: no held KV (not finished, or not hold_kv)")
        states, pool = self.scheduler.memory_states, self.runner.memory_pool
        if states is None or pool is None:
            return None
        # The slot holds the memory after the computed tokens: its weights are those at the
        # last boundary, and reading it as of that boundary leaves out the pending inputs.
        boundary = states.boundary(request.num_computed_tokens)
        if not boundary:
            return None
        block_size = self.config.cache.block_size
        block_hash = block_hashes_for(request.all_token_ids[:boundary], block_size)[-1]
        return block_hash, pool.read(states.slot(request_id), boundary)

    def import_memory_snapshot(self, block_hash: bytes, tensors: dict[str, torch.Tensor]) -> bool:
        """Titans: keep a memory-state snapshot from elsewhere (the KV store;
        ``export_memory_snapshot``'s tensors) under ``block_hash``, the hash of the block that
        ends at its chunk boundary, so a prompt whose prefix KV is cached up to there starts
        from it. Returns True when written; False when there is nothing to do (that snapshot
        is already here, prefix caching is off) or no free slot to hold it.

        Checked first: ``ValueError`` naming the field for a model without memory, a bad hash,
        or tensors that are not this model's state at a boundary (names, shapes, finite)."""
        states, pool = self.scheduler.memory_states, self.runner.memory_pool
        if states is None or pool is None:
            raise ValueError("memory_state: this model has no memory state (not Titans)")
        # 16 bytes: the blake2b-128 chained hashes of kv_cache.hash_block_tokens.
        require(
            isinstance(block_hash, bytes) and len(block_hash) == 16,
            "block_hash",
            "a 16-byte chained block hash",
            block_hash,
        )
        check_memory_state(pool.expected_shapes(0), tensors)
        slot = states.import_snapshot(block_hash)
        if slot is None:
            return False
        pool.write(slot, 0, tensors)
        return True

    def check_prompt_block_hashes(
        self, prompt_token_ids: list[int], block_hashes: Sequence[bytes]
    ) -> None:
        """Raise ``ValueError`` naming ``block_hashes`` unless they are this engine's chained
        hashes of the prompt's full blocks (a decode instance checks a KV header's hashes
        against the prompt it was sent before registering the blocks under its own)."""
        check_block_hashes(prompt_token_ids, block_hashes, self.config.cache.block_size)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        sampling_params: SamplingParams,
        kv: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        block_hashes: Sequence[bytes] | None = None,
        memory_state: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Continue decoding a request prefilled elsewhere; ``kv`` holds its prompt's blocks.

        ``features`` ([prompt tokens, hidden], ``ExportedKV.features``): the target features of
        the prompt, which the EAGLE head drafts from (ignored without speculation). Without
        them the head drafts from whatever those slots held: still lossless, but fewer drafts
        are accepted. ``block_hashes``: the hashes that came with the KV (its wire header),
        checked against the prompt's. ``memory_state`` (``ExportedKV.memory_state``): a Titans
        model's memory state after the prompt, required for Titans and refused otherwise.

        Every check runs before any work: a bad argument raises ``ValueError`` naming it
        (``RequestRejected`` when the request could never fit). Returns False (nothing
        changed) when there is no room yet: the caller retries later.
        """
        self._check_request_id(request_id)
        self._check_params(sampling_params)
        if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
            raise ValueError(
                f"prompt_token_ids: expected a non-empty list of token ids, got "
                f"{prompt_token_ids!r:.60}"
            )
        vocab = self.model_config.vocab_size
        check_token_ids("prompt_token_ids", prompt_token_ids, vocab)
        check_token_ids("first_token_id", [first_token_id], vocab)
        self.scheduler.check_admissible(
            request_id, len(prompt_token_ids), sampling_params.max_tokens
        )
        check_prefilled_kv(
            self.model_config, self.config.cache.block_size, len(prompt_token_ids), kv, features
        )
        if block_hashes is not None:
            self.check_prompt_block_hashes(prompt_token_ids, block_hashes)
        pool = self.runner.memory_pool
        if (memory_state is None) != (pool is None):
            expected = "the Titans memory state" if pool is not None else "None (not Titans)"
            got = type(memory_state).__name__
            raise ValueError(f"memory_state: expected {expected}, got {got}")
        if pool is not None:
            check_memory_state(pool.expected_shapes(len(prompt_token_ids)), memory_state)
        request = Request(request_id, prompt_token_ids, sampling_params, self.eos_token_ids)
        request.append_output_token(first_token_id)
        blocks = self.scheduler.add_prefilled_request(request)
        if blocks is None:
            return False
        try:
            self.runner.write_blocks(blocks, kv)
            if features is not None and isinstance(self.runner, SpecDecodeRunner):
                self.runner.write_features(blocks, features)
            if pool is not None:
                slot = self.scheduler.memory_states.slot(request_id)
                pool.write(slot, len(prompt_token_ids), memory_state)
        except Exception:
            # Nothing of a request whose KV did not arrive may stay admitted.
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
            raise
        tracked = self._track(request, None)
        tracked.token_ids.append(first_token_id)
        tracked.detokenizer.add_tokens([first_token_id])
        tracked.text = tracked.detokenizer.output_text
        return True

    def abort_request(self, request_id: str) -> None:
        if request_id in self._tracked:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
            self._finish(request_id, "abort", time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def is_unfinished(self, request_id: str) -> bool:
        return request_id in self._tracked

    def step(self) -> list[StreamDelta]:
        """Run one step; return what each affected request produced.

        A request that fails in the step (its sample or verification raises, or its output
        cannot be processed) finishes with "error" and its message; the others go on. When the
        step fails as a whole (the model's forward raised), every request it scheduled fails
        that way, its blocks freed; the engine keeps serving new requests.
        """
        started = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        context = scheduler_output.total_num_scheduled_tokens + sum(
            self.scheduler.requests[rid].num_computed_tokens
            for rid in scheduler_output.num_scheduled_tokens
        )
        try:
            runner_output = self.runner.execute(scheduler_output)
            if self._moe_stats and not scheduler_output.is_empty:  # the model ran this step
                self._record_moe_load()
        except Exception as exc:
            return self._fail_step(scheduler_output, exc)
        self.last_step = StepRecord(
            num_tokens=scheduler_output.total_num_scheduled_tokens,
            num_requests=len(scheduler_output.num_scheduled_tokens),
            num_context_tokens=context,
            seconds=time.perf_counter() - started,
            num_draft_tokens=sum(scheduler_output.num_draft_tokens.values()),
        )
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        now = time.monotonic()
        deltas = []
        for update in updates:
            rid = update.request_id
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            try:
                delta = self._apply_update(update, tracked, now)
            except Exception as exc:  # e.g. detokenizing: this request's fault alone
                error = f"output processing: {type(exc).__name__}: {exc}"
                self.scheduler.fail_requests([rid], error)
                delta = StreamDelta(rid, "", list(update.new_token_ids), True, "error", error)
            deltas.append(delta)
            if delta.finish_reason is not None:
                self._finish(rid, delta.finish_reason, now, delta.error)
        return deltas

    def _apply_update(
        self, update: RequestUpdate, tracked: _TrackedRequest, now: float
    ) -> StreamDelta:
        """Add a request's new tokens to its output (text, stop strings, timing)."""
        tracked.num_cached_tokens = update.num_cached_tokens
        finish_reason = update.finish_reason
        if update.new_token_ids:
            if tracked.metrics.first_token_time is None:
                tracked.metrics.first_token_time = now
            tracked.metrics.token_times.extend([now] * len(update.new_token_ids))
            tracked.token_ids.extend(update.new_token_ids)
            tracked.detokenizer.add_tokens(update.new_token_ids)
            tracked.text = tracked.detokenizer.output_text
            truncated = None
            if tracked.stop_matcher is not None and finish_reason is None:
                truncated = tracked.stop_matcher.find(tracked.text)
            if truncated is not None:
                tracked.text = truncated
                finish_reason = "stop"
                self.scheduler.finish_requests([update.request_id], RequestStatus.FINISHED_STOPPED)
            elif finish_reason is not None:
                # The stream ends: release text held back for an incomplete character.
                tracked.detokenizer.flush()
                tracked.text = tracked.detokenizer.output_text
        return self._delta(
            update.request_id, tracked, update.new_token_ids, finish_reason, update.error
        )

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[StreamDelta]:
        """A step that raised as a whole: fail every request it scheduled or sent to the
        runner (their runner state may be half-applied), and drop runner state the step may
        not have dropped. Scheduler and runner are consistent again afterwards."""
        error = f"step failed: {type(exc).__name__}: {exc}"
        ids = dict.fromkeys([*out.num_scheduled_tokens, *(r.request_id for r in out.new_requests)])
        logger.warning("%s; failing requests %s", error, list(ids), exc_info=exc)
        failed = self.scheduler.fail_requests(ids, error)
        self.runner.forget(out.finished_request_ids | out.preempted_request_ids | set(failed))
        self.last_step = None  # no step ran: nothing for a cost model to learn from
        now = time.monotonic()
        deltas = []
        for rid in failed:
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            deltas.append(self._delta(rid, tracked, [], "error", error))
            self._finish(rid, "error", now, error)
        return deltas

    def _delta(
        self,
        request_id: str,
        tracked: _TrackedRequest,
        new_ids: list[int],
        finish_reason: str | None,
        error: str | None = None,
    ) -> StreamDelta:
        # While running, hold back text that could still turn out to begin a stop string.
        visible = len(tracked.text)
        if finish_reason is None and tracked.stop_matcher is not None:
            visible -= tracked.stop_matcher.holdback(tracked.text)
        visible = max(visible, tracked.streamed_chars)
        text = tracked.text[tracked.streamed_chars : visible]
        tracked.streamed_chars = visible
        return StreamDelta(
            request_id, text, list(new_ids), finish_reason is not None, finish_reason, error
        )

    def _finish(
        self, request_id: str, finish_reason: str, now: float, error: str | None = None
    ) -> None:
        tracked = self._tracked.pop(request_id)
        tracked.finish_reason = finish_reason
        tracked.metrics.finished_time = now
        if isinstance(self.runner, SpecDecodeRunner):
            stats = self.runner.stats
            tracked.metrics.spec_acceptance_lengths = stats.acceptance_lengths.pop(request_id, [])
            step_s, plain_s = stats.request_seconds.pop(request_id, (0.0, 0.0))
            tracked.metrics.spec_step_seconds = step_s
            tracked.metrics.spec_plain_step_seconds = plain_s
        if self.spec_controller is not None:
            self.spec_controller.forget(request_id)
        self._finished[request_id] = RequestOutput(
            request_id=request_id,
            prompt=tracked.prompt,
            prompt_token_ids=tracked.prompt_token_ids,
            outputs=[CompletionOutput(0, tracked.text, tracked.token_ids, finish_reason)],
            finished=True,
            num_cached_tokens=tracked.num_cached_tokens,
            metrics=tracked.metrics,
            error=error,
        )

    def pop_finished(self, request_id: str) -> RequestOutput:
        """The final output of a finished request (once; it is then forgotten)."""
        return self._finished.pop(request_id)

    def discard_finished(self, request_id: str) -> None:
        """Forget a finished request's output if it is still kept (a streaming caller that
        already saw every delta has no use for it)."""
        self._finished.pop(request_id, None)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._tracked)

    def pop_all_finished(self) -> list[RequestOutput]:
        outputs = list(self._finished.values())
        self._finished.clear()
        return outputs

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def spec_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding totals since start (a copy), or None without speculation."""
        if not isinstance(self.runner, SpecDecodeRunner):
            return None
        return copy.deepcopy(self.runner.stats)

    # ---- MoE expert load -------------------------------------------------------------------

    def moe_stats(self) -> dict[int, MoEStats]:
        """Expert load of each MoE layer (decoder layer index -> a copy of its stats), summed
        over every step since the engine started; {} for a dense model.

        NOTE: the counts are the (token, choice) pairs the model computed, so they include
        calibration and warm-up steps, and not prompt tokens served from the prefix cache.
        """
        return copy.deepcopy(self._moe_stats)

    def _record_moe_load(self) -> None:
        """Add the step's routing of every MoE layer (``layer.last_routing``) to its stats.

        NOTE: reads a few counts to the host per MoE layer, after sampling has already waited
        for the step, so the device has nothing queued to drain.
        """
        layers = self.model.model.layers
        for index, stats in self._moe_stats.items():
            stats.update(layers[index].last_routing)


def draft_budget_for(
    spec: SpeculativeConfig | None, controller: SpeculationController | None
) -> DraftBudget | None:
    """The scheduler's per-step draft budget: the speculation policy's decision (raycake.policies),
    or None when nothing drafts."""
    if spec is None or spec.method is None or spec.policy == "off" or controller is None:
        return None
    return controller.budget_for
