"""The model runner with EAGLE speculation: draft a tree, verify it in the target's step, keep
the accepted tokens' KV, and keep the draft head's own KV current.

Per step: (1) the head catches up on every token committed since it last ran for the requests
that draft this step, which yields each one's root feature; (2) it grows an EAGLE-2 tree from
that root (one head forward per depth, batched over requests); (3) one target forward runs
every request's span, a verify request's span being its last token plus the tree under a tree
mask; (4) verification accepts a path, whose KV (and features) are copied down to the
positions they now hold. The head runs only for requests that draft: when the speculation
policy gives a request no budget (e.g. in a large batch), it costs nothing, and the head
catches up in one forward when drafting resumes.

The head's KV lives beside the target's, in the same slots (a request's block table serves
both). Its entry at position p pairs the target's feature at p - 1 with the token at p;
position 0 has none and is masked out. Target features are kept per slot. A new request's head
entries are always computed from position 1, since a prefix-cache hit may bring blocks whose
head entries were never written (their request never drafted). Tree nodes expanded during
drafting write their head KV into scratch blocks after the pool, one region per request of the
step.

Legend: R verify requests, M expanded nodes of one depth, E hidden, V vocabulary, P block size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raycake.engine.runner import (
    ChunkInputs,
    ModelRunner,
    RunnerRequestState,
    _additive_mask,
    reseed,
)
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import SpeculationController
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
from raycake.model.attention import AttentionMetadata, QuerySpan
from raycake.model.eagle import EagleDraftHead
from raycake.model.llama import LlamaForCausalLM
from raycake.policies.speculation import tree_shape

# Verify steps whose timings are not reported to the speculation policy (see ``execute``).
COLD_VERIFY_STEPS = 3


@dataclass
class HeadState:
    next_position: int  # the first position whose head entry is not written yet
    root_feature: torch.Tensor | None  # [E] the head's output at the last known token


@dataclass
class _Candidate:
    token_id: int
    parent: int  # candidate index, -1 for a child of the root
    depth: int
    score: float  # cumulative draft log-probability
    feature: torch.Tensor | None = None  # [E] the head's output here, once expanded
    scratch: int = -1  # the head KV slot (within the request's scratch region), once expanded


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
        super().__init__(model, block_size, num_blocks, seed)
        self.head = head
        self.spec = spec
        # The speculation policy's state: fed each step's acceptance and measured costs.
        self.controller = controller
        config = model.config
        expanded = (spec.max_depth - 1) * spec.tree_top_k  # head forwards of one tree, at most
        self.scratch_blocks = max(1, -(-expanded // block_size))
        total_blocks = num_blocks + max_num_seqs * self.scratch_blocks
        kv_shape = (2, total_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.head_kv = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.features = torch.zeros(
            num_blocks * block_size, config.hidden_size, dtype=self.dtype, device=self.device
        )
        # Drafts come from the head's draft vocabulary when it has one: the lm_head rows of
        # those tokens, copied once (the lm_head is the target's, frozen).
        vocab = head.draft_vocab
        if vocab is not None and len(vocab) < spec.tree_top_k:
            raise ValueError(
                f"speculative.tree_top_k: {spec.tree_top_k} exceeds the head's draft vocabulary "
                f"of {len(vocab)} tokens"
            )
        self.draft_vocab = None if vocab is None else vocab.to(self.device)
        self.draft_lm_head = (
            None if vocab is None else model.lm_head.weight.detach()[self.draft_vocab].clone()
        )  # [Vd, E]
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
        drafting = list(out.num_draft_tokens)
        caught_up_tokens = self._extend_head(drafting)
        caught_up = time.perf_counter()
        self.trees = self._draft(out.num_draft_tokens)
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
        rows = torch.cat(
            [torch.arange(span.start, span.end, device=hidden.device) for _, span in verify]
        )
        all_logits = self.model.compute_logits(hidden[rows])  # [sum(1 + n), V]
        # NaN rows (a poisoned forward) fail their request: argmax would pick the NaN and
        # commit a garbage token silently. One device read for the whole step.
        nan_rows = all_logits.isnan().any(dim=-1).tolist()  # [sum(1 + n)]
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

    def _extend_head(self, request_ids: list[str]) -> int:
        """Write the head's entries for every newly committed token (feature at p - 1, token p);
        returns how many entries were written."""
        tokens: list[int] = []
        positions: list[int] = []
        feature_slots: list[int] = []
        slots: list[int] = []
        spans: list[QuerySpan] = []
        roots: list[tuple[str, int]] = []  # requests whose last known token got an entry
        bs = self.block_size
        device = self.device
        for rid in request_ids:
            state, head = self.requests.get(rid), self.head_states.get(rid)
            if state is None or head is None:
                continue
            # NOTE: the last known token's slot may be allocated only in the next step.
            num_slots = len(state.block_ids) * bs
            last = min(state.num_computed_tokens, len(state.token_ids) - 1, num_slots - 1)
            first_pos = head.next_position
            if last < first_pos:
                continue
            start = len(tokens)
            for p in range(first_pos, last + 1):
                tokens.append(state.token_ids[p])
                positions.append(p)
                feature_slots.append(self._slot(state, p - 1))
                slots.append(self._slot(state, p))
            context = last + 1
            cols = torch.arange(context, device=device)[None, :]
            q_pos = torch.arange(first_pos, last + 1, device=device)[:, None]
            mask = _additive_mask((cols > q_pos) | (cols == 0), self.dtype)  # [n, C]
            table = state.block_ids[: -(-context // bs)]
            block_ids = torch.tensor(table, dtype=torch.long, device=device)
            spans.append(QuerySpan(start, len(tokens), block_ids, context, mask))
            head.next_position = last + 1
            if last == len(state.token_ids) - 1:
                roots.append((rid, len(tokens) - 1))
        if not tokens:
            return 0
        meta = AttentionMetadata(bs, torch.tensor(slots, device=device), 0, None, None, spans)
        out = self.head(
            self.features[torch.tensor(feature_slots, device=device)],
            torch.tensor(tokens, device=device),
            torch.tensor(positions, device=device),
            self.model.model.embed_tokens,
            meta,
            self.head_kv,
        )  # [T', E]
        for rid, row in roots:
            self.head_states[rid].root_feature = out[row]
        return len(tokens)

    def _draft(self, budgets: dict[str, int]) -> dict[str, DraftTree]:
        """Grow an EAGLE-2 tree per request: expand the ``width`` best nodes of each depth
        (``tree_top_k`` children each), then keep the ``budget`` best candidates overall."""
        if not budgets:
            return {}
        rids = list(budgets)
        k = self.spec.tree_top_k
        shapes = [tree_shape(budgets[r], self.spec.max_depth, k) for r in rids]
        hidden = self.model.config.hidden_size
        roots = torch.stack(
            [
                self.head_states[r].root_feature
                if self.head_states[r].root_feature is not None
                else torch.zeros(hidden, dtype=self.dtype, device=self.device)
                for r in rids
            ]
        )  # [R, E]
        vals, idx = self._draft_top_k(roots, k)  # [R, k]
        cands = [
            [_Candidate(int(t), -1, 1, float(v)) for t, v in zip(idx[r], vals[r], strict=True)]
            for r in range(len(rids))
        ]
        frontier = [list(range(width)) for _, width in shapes]
        for depth in range(1, max(d for d, _ in shapes)):
            active = [r for r in range(len(rids)) if depth < shapes[r][0]]
            out = self._expand(rids, roots, cands, frontier, active, depth)  # [M, E]
            vals, idx = self._draft_top_k(out, k)  # [M, k]
            vals_l, idx_l = vals.tolist(), idx.tolist()
            row = 0
            for r in active:
                children = []
                for c in frontier[r]:
                    parent = cands[r][c]
                    parent.feature = out[row]
                    for t, v in zip(idx_l[row], vals_l[row], strict=True):
                        children.append(len(cands[r]))
                        cands[r].append(_Candidate(t, c, depth + 1, parent.score + v))
                    row += 1
                width = shapes[r][1]
                frontier[r] = sorted(children, key=lambda i, r=r: -cands[r][i].score)[:width]
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

    def _draft_top_k(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's k likeliest next tokens after each feature [M, E]: (log-probabilities,
        token ids), both [M, k]; over the draft vocabulary when the head has one."""
        if self.draft_lm_head is None:
            logp = self.model.compute_logits(features).log_softmax(-1)  # [M, V]
            return logp.topk(k, dim=-1)
        logits = torch.nn.functional.linear(features, self.draft_lm_head).float()  # [M, Vd]
        vals, idx = logits.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        return vals, self.draft_vocab[idx]

    def _expand(
        self,
        rids: list[str],
        roots: torch.Tensor,
        cands: list[list[_Candidate]],
        frontier: list[list[int]],
        active: list[int],
        depth: int,
    ) -> torch.Tensor:
        """One head forward over the frontier nodes at ``depth`` of the active requests."""
        bs, k = self.block_size, self.spec.tree_top_k
        device = self.device
        features, tokens, positions, slots = [], [], [], []
        spans: list[QuerySpan] = []
        for r in active:
            state = self.requests[rids[r]]
            root = state.num_computed_tokens
            committed_blocks = state.block_ids[: -(-(root + 1) // bs)]
            base = self.num_blocks + r * self.scratch_blocks
            scratch_blocks = list(range(base, base + self.scratch_blocks))
            committed = len(committed_blocks) * bs
            context = committed + self.scratch_blocks * bs
            # Each node attends the committed tokens but position 0 (no head entry there),
            # itself and its expanded ancestors in the scratch region: (row, column) pairs
            # gathered here, set in one indexed write on the device.
            mask_rows: list[int] = []
            mask_cols: list[int] = []
            start = len(tokens)
            for j, c in enumerate(frontier[r]):
                node = cands[r][c]
                node.scratch = (depth - 1) * k + j
                parent = cands[r][node.parent] if node.parent >= 0 else None
                features.append(roots[r] if parent is None else parent.feature)
                tokens.append(node.token_id)
                positions.append(root + depth)
                slots.append(base * bs + node.scratch)
                a = c
                while a >= 0:  # itself and its ancestors, all expanded
                    mask_rows.append(j)
                    mask_cols.append(committed + cands[r][a].scratch)
                    a = cands[r][a].parent
            allowed = torch.zeros(len(frontier[r]), context, dtype=torch.bool, device=device)
            allowed[:, 1 : root + 1] = True
            allowed[
                torch.tensor(mask_rows, dtype=torch.long, device=device),
                torch.tensor(mask_cols, dtype=torch.long, device=device),
            ] = True
            table = committed_blocks + scratch_blocks
            block_ids = torch.tensor(table, dtype=torch.long, device=device)
            mask = _additive_mask(~allowed, self.dtype)
            spans.append(QuerySpan(start, len(tokens), block_ids, context, mask))
        meta = AttentionMetadata(bs, torch.tensor(slots, device=device), 0, None, None, spans)
        return self.head(
            torch.stack(features),
            torch.tensor(tokens, device=device),
            torch.tensor(positions, device=device),
            self.model.model.embed_tokens,
            meta,
            self.head_kv,
        )
