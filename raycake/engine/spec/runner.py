"""The model runner with EAGLE speculation: draft a tree, verify it in the target's step, keep
the accepted tokens' KV, and keep the draft head's own KV current.

Per step: (1) the head catches up on every token committed since it last ran for the requests
that draft this step, which yields each one's root (the head's h at its last token) and
gathers their committed head KV once; (2) it grows an EAGLE-2 tree from that root (one head
forward per depth, batched over requests); (3) one target forward runs every request's span, a
verify request's span being its last token plus the tree under a tree mask; (4) verification
accepts a path, whose KV (and features) are copied down to the positions they now hold. The
head runs only for requests that draft: when the speculation policy gives a request no budget
(e.g. in a large batch), it costs nothing, and the head catches up in one forward when
drafting resumes. The head's forwards are ``EagleDrafter``'s (raycake/engine/spec/drafter.py).

The head's KV lives beside the target's, in the same slots (a request's block table serves
both). Its entry at position p pairs the target's feature at p - 1 with the token at p;
position 0 has none and is masked out. Target features are kept per slot. A new request's head
entries are always computed from position 1, since a prefix-cache hit may bring blocks whose
head entries were never written (their request never drafted).

Legend: R verify requests, M expanded nodes of one depth, E hidden, D draft layer width,
V vocabulary, P block size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raycake.engine.runner import ChunkInputs, ModelRunner, RunnerRequestState, reseed
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import SpeculationController
from raycake.engine.spec.drafter import CatchUpBatch, DraftContext, EagleDrafter
from raycake.engine.spec.tree import (
    DraftTree,
    SpecDecodeStats,
    Verdict,
    select_tree,
    target_probs,
    tree_attention_mask,
    verify_greedy,
    verify_sampling,
)
from raycake.engine.step_contract import RunnerOutput, SchedulerOutput
from raycake.model.attention import QuerySpan
from raycake.model.eagle import EagleDraftHead
from raycake.model.llama import LlamaForCausalLM
from raycake.policies.speculation import tree_shape

# Verify steps whose timings are not reported to the speculation policy (see ``execute``).
COLD_VERIFY_STEPS = 3


@dataclass
class HeadState:
    next_position: int  # the first position whose head entry is not written yet
    root_feature: torch.Tensor | None  # [D] the head's h at the last known token


@dataclass
class _Candidate:
    token_id: int
    parent: int  # candidate index, -1 for a child of the root
    depth: int
    score: float  # cumulative draft log-probability
    row: int = -1  # once expanded: its row in that depth's head output
    columns: tuple[int, ...] = ()  # once expanded: draft columns it attends (ancestors, itself)


class SpecDecodeRunner(ModelRunner):
    def __init__(
        self,
        model: LlamaForCausalLM,
        head: EagleDraftHead,
        spec: SpeculativeConfig,
        block_size: int,
        num_blocks: int,
        max_num_seqs: int,
        seed: int = 0,
        controller: SpeculationController | None = None,
    ) -> None:
        del max_num_seqs  # unused: draft nodes keep their KV in a per-step buffer, not blocks
        super().__init__(model, block_size, num_blocks, seed)
        self.head = head
        self.spec = spec
        # The speculation policy's state: fed each step's acceptance and measured costs.
        self.controller = controller
        self.features = torch.zeros(
            num_blocks * block_size, model.config.hidden_size, dtype=self.dtype, device=self.device
        )
        # Drafts come from the head's draft vocabulary when it has one.
        vocab = head.draft_vocab
        if vocab is not None and len(vocab) < spec.tree_top_k:
            raise ValueError(
                f"speculative.tree_top_k: {spec.tree_top_k} exceeds the head's draft vocabulary "
                f"of {len(vocab)} tokens"
            )
        self.drafter = EagleDrafter(head, model, num_blocks * block_size, block_size)
        self.head_states: dict[str, HeadState] = {}
        self.trees: dict[str, DraftTree] = {}  # this step's
        self.stats = SpecDecodeStats()
        self.num_verify_steps_run = 0  # steps that verified at least one tree

    def _slot(self, state: RunnerRequestState, index: int) -> int:
        return state.block_ids[index // self.block_size] * self.block_size + index % self.block_size

    def _apply_deltas(self, out: SchedulerOutput) -> None:
        super()._apply_deltas(out)
        for rid in out.finished_request_ids | out.preempted_request_ids:
            self.head_states.pop(rid, None)
        for new in out.new_requests:
            self.head_states[new.request_id] = HeadState(1, None)

    def _chunk_inputs(self, rid: str, state: RunnerRequestState, n: int) -> ChunkInputs:
        tree = self.trees.get(rid)
        if tree is None:
            return super()._chunk_inputs(rid, state, n)
        root = state.num_computed_tokens
        return ChunkInputs(
            token_ids=[state.token_ids[root], *tree.token_ids],
            positions=[root] + [root + d for d in tree.depths],
            mask=tree_attention_mask(tree, root, self.dtype, self.device),
            samples=False,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self._apply_deltas(out)
        if out.is_empty:
            return RunnerOutput(sampled_token_ids={})
        started = time.perf_counter()
        budgets = self._deepest_first(out.num_draft_tokens)
        caught_up_tokens, context = self._extend_head(budgets)
        caught_up = time.perf_counter()
        self.trees = self._draft(budgets, context)
        for rid, tree in self.trees.items():
            if tree.num_nodes > out.num_draft_tokens[rid]:
                raise RuntimeError(
                    f"request {rid!r}: a draft tree of {tree.num_nodes} nodes exceeds its "
                    f"budget of {out.num_draft_tokens[rid]} slots"
                )
        drafted = time.perf_counter()
        inputs = self.prepare(out)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        self.features[inputs.meta.slot_mapping] = hidden
        sampled, errors = self._sample(inputs, hidden)
        for rid, n in out.num_scheduled_tokens.items():
            if rid not in self.trees:
                self.requests[rid].num_computed_tokens += n
        verified_tokens, verify_errors = self._verify(
            inputs.span_request_ids, inputs.meta.spans, hidden
        )
        sampled.update(verified_tokens)
        errors.update(verify_errors)
        verified = time.perf_counter()
        self.stats.draft_seconds += drafted - started
        self.stats.target_seconds += verified - drafted
        if self.trees:
            self.num_verify_steps_run += 1
        # The first verify steps run new shapes on cold caches (several times slower here):
        # timing them would tell the policy that drafting never pays.
        warm = self.num_verify_steps_run > COLD_VERIFY_STEPS
        if self.controller is not None and (warm or not self.trees):
            # The policy weighs decode steps: a step with a prompt chunk in it says little
            # about what one more draft token costs (its attention spans the whole prompt).
            num_drafts = sum(out.num_draft_tokens.values())
            if out.total_num_scheduled_tokens == len(out.num_scheduled_tokens) + num_drafts:
                self.controller.observe_target_step(
                    out.total_num_scheduled_tokens, verified - drafted, drafting=bool(self.trees)
                )
            if self.trees:
                depth = max(max(t.depths, default=1) for t in self.trees.values())
                catch_up_s, tree_s = caught_up - started, drafted - caught_up
                if caught_up_tokens > 2 * (self.spec.max_depth + 1) * len(self.trees):
                    # A catch-up over a whole prompt, or after steps without drafts, is not a
                    # steady step's: count it as a steady one, about one more expansion.
                    catch_up_s = tree_s / max(depth - 1, 1)
                self.controller.observe_drafting(depth, len(self.trees), catch_up_s + tree_s)
        if self.controller is not None and self.trees:
            self._account_speedup(out, sampled, verified - started)
        return RunnerOutput(sampled_token_ids=sampled, errors=errors)

    def forget(self, request_ids: set[str]) -> None:
        super().forget(request_ids)
        for rid in request_ids:
            self.head_states.pop(rid, None)
        self.trees = {}  # a failed step's trees must not shape the next step's spans

    # ---- target features: what the head drafts from, exported with a prompt's KV -----------

    def _token_slots(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.block_size
        slots = [block_ids[p // bs] * bs + p % bs for p in range(num_tokens)]
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def read_features(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """The target's features at positions 0..num_tokens-1 of a sequence held in
        ``block_ids`` (a copy): [num_tokens, E]."""
        return self.features[self._token_slots(block_ids, num_tokens)]

    @torch.inference_mode()
    def write_features(self, block_ids: list[int], features: torch.Tensor) -> None:
        """Put the features [N, E] of positions 0..N-1 into a sequence's slots, so the head's
        catch-up drafts from the target's real features (``read_features`` on another engine)."""
        index = self._token_slots(block_ids, features.shape[0])
        self.features[index] = features.to(device=self.device, dtype=self.dtype)

    def _account_speedup(
        self, out: SchedulerOutput, sampled: dict[str, list[int]], seconds: float
    ) -> None:
        """Add a verify step to the speedup estimate: what it emitted in ``seconds`` against one
        token per sampling request in a plain step over the same tokens minus the drafts."""
        assert self.controller is not None
        plain_tokens = out.total_num_scheduled_tokens - sum(out.num_draft_tokens.values())
        plain_seconds = self.controller.cost().step_seconds(plain_tokens, drafting=False)
        stats = self.stats
        stats.verify_step_seconds += seconds
        stats.verify_step_tokens += sum(len(t) for t in sampled.values())
        stats.plain_step_tokens += len(sampled)
        stats.plain_step_seconds += plain_seconds
        for rid in self.trees:
            totals = stats.request_seconds.setdefault(rid, [0.0, 0.0])
            totals[0] += seconds
            totals[1] += plain_seconds

    # ---- verification ----------------------------------------------------------------------

    def _verify(
        self, span_ids: list[str], spans: list[QuerySpan], hidden: torch.Tensor
    ) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Accept a path of each tree, move its KV to its positions; commit the tokens. A
        request whose verification raises gets an error instead (the others go on)."""
        sampled: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        src: list[int] = []
        dst: list[int] = []
        verify = [
            (rid, span) for rid, span in zip(span_ids, spans, strict=True) if rid in self.trees
        ]
        if not verify:
            return sampled, errors
        # One lm_head pass over every tree's rows: at small batches a step reads the weights,
        # so a pass per request would read them once per request.
        rows = [i for _, span in verify for i in range(span.start, span.end)]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            picked = hidden[rows[0] : rows[0] + len(rows)]
        else:
            picked = hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)]
        all_logits = self.model.compute_logits(picked)  # [sum(1 + n), V]
        # NaN rows (a poisoned forward) fail their request: argmax would pick the NaN and
        # commit a garbage token silently. One pass (amax propagates NaN), one device read.
        nan_rows = all_logits.amax(dim=-1).isnan().tolist()  # [sum(1 + n)]
        offset = 0
        for rid, span in verify:
            tree = self.trees[rid]
            state = self.requests[rid]
            n = span.end - span.start
            logits = all_logits[offset : offset + n]  # [1 + n, V]
            has_nan = any(nan_rows[offset : offset + n])
            offset += n
            try:
                if has_nan:
                    raise ValueError("the model's logits contain NaN")
                verdict = self._verdict(state, tree, logits)
            except Exception as exc:  # this request fails; the batch goes on
                errors[rid] = f"verification: {type(exc).__name__}: {exc}"
                continue
            root = state.num_computed_tokens
            for j, node in enumerate(verdict.accepted_nodes):
                if (
                    node != j
                ):  # node i sits in slot root + 1 + i; depth j + 1 belongs at root + 1 + j
                    src.append(self._slot(state, root + 1 + node))
                    dst.append(self._slot(state, root + 1 + j))
            emitted = verdict.emitted(tree)
            state.token_ids.extend(emitted)
            state.num_computed_tokens = root + len(emitted)
            sampled[rid] = emitted
            self.stats.num_verify_steps += 1
            self.stats.num_draft_tokens += tree.num_nodes
            self.stats.num_accepted_tokens += len(verdict.accepted_nodes)
            self.stats.num_emitted_tokens += len(emitted)
            self.stats.acceptance_lengths.setdefault(rid, []).append(len(emitted))
            if self.controller is not None:
                # The acceptance model is per depth: a tree as deep as a chain of that length.
                self.controller.observe_verify(
                    rid, max(tree.depths, default=0), len(verdict.accepted_nodes)
                )
        if src:
            s = torch.tensor(src, dtype=torch.long, device=self.device)
            d = torch.tensor(dst, dtype=torch.long, device=self.device)
            for cache in self.kv_caches:
                cache[:, d] = cache[:, s]
            self.features[d] = self.features[s]
        return sampled, errors

    def _verdict(self, state: RunnerRequestState, tree: DraftTree, logits: torch.Tensor) -> Verdict:
        """Verify one request's tree against the target's logits [1 + n, V]."""
        params = state.sampling_params
        if params.is_greedy:
            return verify_greedy(tree, logits)
        reseed(state)
        return verify_sampling(tree, target_probs(logits, params), state.generator)

    # ---- the draft head --------------------------------------------------------------------

    def _deepest_first(self, budgets: dict[str, int]) -> dict[str, int]:
        """``budgets`` ordered by tree depth, deepest first: the requests still growing at
        any depth are then a prefix of the order, which the drafter batches without a gather."""
        depth = {rid: self._shape(b)[0] for rid, b in budgets.items()}
        return dict(sorted(budgets.items(), key=lambda item: -depth[item[0]]))

    def _shape(self, budget: int) -> tuple[int, int]:
        return tree_shape(budget, self.spec.max_depth, self.spec.tree_top_k)

    def _extend_head(self, budgets: dict[str, int]) -> tuple[int, DraftContext | None]:
        """Write the head's entries for every token committed since it last ran (feature at
        p - 1, token p) for the requests of ``budgets``, and gather their context for the
        tree. Returns how many entries were written, and the context (None: no request)."""
        if not budgets:
            return 0, None
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        feature_slots: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        context_lens: list[int] = []
        row_starts = [0]
        roots: list[tuple[str, int]] = []  # requests whose last known token got an entry
        for rid in budgets:
            state, head = self.requests[rid], self.head_states[rid]
            # NOTE: the last known token's slot may be allocated only in the next step.
            num_slots = len(state.block_ids) * bs
            last = min(state.num_computed_tokens, len(state.token_ids) - 1, num_slots - 1)
            for p in range(head.next_position, last + 1):
                tokens.append(state.token_ids[p])
                positions.append(p)
                feature_slots.append(self._slot(state, p - 1))
                slots.append(self._slot(state, p))
            if last >= head.next_position:
                head.next_position = last + 1
                if last == len(state.token_ids) - 1:
                    roots.append((rid, len(tokens) - 1))
            tables.append(state.block_ids[: -(-(last + 1) // bs)])
            context_lens.append(last + 1)
            row_starts.append(len(tokens))
        depth, width = map(max, zip(*(self._shape(b) for b in budgets.values()), strict=True))
        batch = CatchUpBatch(tokens, positions, slots, tables, context_lens, row_starts)
        index = torch.tensor(feature_slots, dtype=torch.long, device=self.device)
        hidden, context = self.drafter.catch_up(batch, self.features[index], (depth - 1) * width)
        for rid, row in roots:
            self.head_states[rid].root_feature = hidden[row]
        return len(tokens), context

    def _draft(self, budgets: dict[str, int], context: DraftContext | None) -> dict[str, DraftTree]:
        """Grow an EAGLE-2 tree per request: expand the ``width`` best nodes of each depth
        (``tree_top_k`` children each), then keep the ``budget`` best candidates overall.

        NOTE: ``budgets`` comes deepest first (``_deepest_first``), in ``context``'s order.
        """
        if not budgets or context is None:
            return {}
        rids = list(budgets)
        k = self.spec.tree_top_k
        shapes = [self._shape(budgets[r]) for r in rids]  # (depth, width) per request
        max_width = max(w for _, w in shapes)
        chain = max_width == 1  # every expanded node is then an ancestor of the next
        drafter = self.drafter
        roots = torch.stack(
            [
                self.head_states[r].root_feature
                if self.head_states[r].root_feature is not None
                else drafter.parent_in.new_zeros(drafter.parent_in.shape[0])
                for r in rids
            ]
        )  # [R, D]
        vals, ids = drafter.top_k(roots, k)  # [R][k]
        cands = [
            [_Candidate(t, -1, 1, v) for t, v in zip(ids[r], vals[r], strict=True)]
            for r in range(len(rids))
        ]
        frontier = [list(range(width)) for _, width in shapes]
        previous = roots  # h of the nodes expanded at the previous depth (the roots first)
        for depth in range(1, shapes[0][0]):
            active = sum(d > depth for d, _ in shapes)  # a prefix: deepest first
            width = max(w for _, w in shapes[:active])
            first_column = (depth - 1) * max_width
            token_ids, positions, parent_rows = [], [], []
            ancestors: list[list[int]] | None = None if chain else []
            for r in range(active):
                position = self.requests[rids[r]].num_computed_tokens + depth
                nodes = frontier[r]
                for i in range(width):
                    node = cands[r][nodes[min(i, len(nodes) - 1)]]  # padded: a copy
                    parent = cands[r][node.parent] if node.parent >= 0 else None
                    if i < len(nodes):
                        node.row = r * width + i
                        column = first_column + i
                        node.columns = (*(parent.columns if parent else ()), column)
                    token_ids.append(node.token_id)
                    positions.append(position)
                    parent_rows.append(r if parent is None else parent.row)
                    if ancestors is not None:
                        ancestors.append(list(node.columns))
            if parent_rows == list(range(len(parent_rows))):
                parents = previous[: len(parent_rows)]
            else:
                index = torch.tensor(parent_rows, dtype=torch.long, device=self.device)
                parents = previous.index_select(0, index)
            previous = drafter.expand(
                context, parents, token_ids, positions, width, first_column, ancestors
            )  # [active x width, D]
            vals, ids = drafter.top_k(previous, k)  # [active x width][k]
            for r in range(active):
                children = []
                for c in frontier[r]:
                    parent = cands[r][c]
                    row = parent.row
                    for t, v in zip(ids[row], vals[row], strict=True):
                        children.append(len(cands[r]))
                        cands[r].append(_Candidate(t, c, depth + 1, parent.score + v))
                frontier[r] = sorted(children, key=lambda i, r=r: -cands[r][i].score)[
                    : shapes[r][1]
                ]
        return {
            rid: select_tree(
                [c.token_id for c in cands[r]],
                [c.parent for c in cands[r]],
                [c.depth for c in cands[r]],
                [c.score for c in cands[r]],
                budgets[rid],
            )
            for r, rid in enumerate(rids)
        }
