"""Drafting with an EAGLE head: its weights folded with the target's embedding and lm_head, its
KV paged beside the target's, and a step's draft tree attended over a dense copy of the context.

Legend: R drafting requests, N catch-up entries, W frontier nodes per request at one depth,
C committed context columns (padded to the longest), S draft columns (one per expanded node),
D draft layer width, E target hidden size, H / K query / kv heads of the draft layer, Dh head
dim, V vocabulary, Vd draft vocabulary, P block size.

Folding. The head computes x = fc([embed(t); f]) = Wt embed(t) + Wf f + b, runs its layer to h
and predicts the feature proj(h) (no proj at full width). A drafted feature only ever feeds the
lm_head and the next fc, both linear, so drafting keeps h and multiplies by
- ``token_in`` [V, D] = embed Wt^T + b, a row lookup instead of a matmul (when it is small);
- ``feature_in`` [D, E] = Wf, for the target's features (the catch-up);
- ``parent_in`` [D, D] = Wf proj, for a drafted parent's h;
- ``draft_logits`` [Vd, D] = lm_head[draft vocabulary] proj.
On a narrow head that reads about a third of the weights of projecting back to E first. The
results equal the head's forward up to float rounding (tests/engine/spec/test_drafter.py).

KV. The head's entry at position p (target feature at p - 1, token at p) is written by the
catch-up into slot p of the request's blocks, in a cache of its own (``kv``). Each drafting
request's committed entries are gathered once per step into a dense buffer with S free columns
after them; the step's expanded nodes write their K/V there, never into the cache, so a
rejected branch leaves nothing behind. Position 0 has no entry and is always masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycake.model.eagle import EagleDraftHead
from raycake.model.llama import LlamaForCausalLM
from raycake.model.rope import apply_rotary

# Above this many elements the [V, D] token table is not built (a large vocabulary times a
# wide head): the embedding is then looked up and multiplied each time.
MAX_TOKEN_TABLE_ELEMENTS = 1 << 24


@dataclass
class CatchUpBatch:
    """The head entries to write this step, request after request, and each request's context.

    Request r's entries are rows ``row_starts[r]:row_starts[r + 1]`` (possibly none); it
    attends positions ``0..context_lens[r] - 1``, its new entries included.
    """

    token_ids: list[int]  # [N] the token at each entry's position
    positions: list[int]  # [N]
    slots: list[int]  # [N] the cache slot of each entry
    block_tables: list[list[int]]  # [R] blocks holding positions 0..context_lens[r] - 1
    context_lens: list[int]  # [R]
    row_starts: list[int]  # [R + 1]


@dataclass
class DraftContext:
    """The committed head entries of a step's drafting requests, gathered for its tree."""

    k: torch.Tensor  # [R, C + S, K, Dh]: C committed columns, then one per expanded node
    v: torch.Tensor  # [R, C + S, K, Dh]
    # [R, 1, 1, C + S] additive: 0 at positions 1..context_len - 1 and at every draft column
    # (a chain's node attends every node drafted before it; a tree adds its own mask).
    mask: torch.Tensor
    num_committed: int  # C


class EagleDrafter:
    """The draft head's inference: catch-up over committed tokens, then tree expansions."""

    def __init__(
        self, head: EagleDraftHead, target: LlamaForCausalLM, num_slots: int, block_size: int
    ) -> None:
        param = next(target.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        config = head.layer_config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.intermediate_size = config.intermediate_size
        self.norm_eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.kv = torch.zeros(
            2, num_slots, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )
        self._fold(head, target)
        layer = head.layer
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = (attn.qkv_proj.weight, attn.qkv_proj.bias)
        self.o = (attn.o_proj.weight, attn.o_proj.bias)
        self.post_norm = layer.post_attention_layernorm.weight
        self.gate_up = (mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
        self.down = (mlp.down_proj.weight, mlp.down_proj.bias)
        self.rotary = head.rotary_emb
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        # Column positions for masks, column 0 (no head entry) set beyond any position, so
        # that one comparison also masks it; grown on demand.
        self._columns = torch.empty(0, dtype=torch.long, device=self.device)
        self._blocked = torch.tensor(float("-inf"), dtype=self.dtype, device=self.device)
        self._open = torch.tensor(0.0, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def _fold(self, head: EagleDraftHead, target: LlamaForCausalLM) -> None:
        hidden = head.config.hidden_size
        fc = head.fc.weight.float()  # [D, 2E]
        token_w, feature_w = fc[:, :hidden], fc[:, hidden:]
        bias = head.fc.bias.float()
        proj = None if head.proj is None else head.proj.weight.float()  # [E, D]
        embed = target.model.embed_tokens.weight  # [V, E]
        self.embed = embed
        self.token_table: torch.Tensor | None = None
        if embed.shape[0] * token_w.shape[0] <= MAX_TOKEN_TABLE_ELEMENTS:
            self.token_table = (embed.float() @ token_w.T + bias).to(self.dtype)  # [V, D]
        self.token_w, self.fc_bias = token_w.to(self.dtype), bias.to(self.dtype)
        self.feature_in = feature_w.to(self.dtype)  # [D, E]
        self.parent_in = (feature_w if proj is None else feature_w @ proj).to(self.dtype)  # [D, D]
        vocab = head.draft_vocab
        rows = target.lm_head.weight
        if vocab is not None:
            rows = rows[vocab.to(rows.device)]  # [Vd, E]
        self.draft_logits = (rows if proj is None else rows.float() @ proj).to(self.dtype)
        # Draft row -> token id (None: the row is the id).
        self.draft_vocab: list[int] | None = None if vocab is None else vocab.tolist()

    # ---- pieces ------------------------------------------------------------------------------

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _token_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n] -> [n, D]: Wt embed(t) + b."""
        if self.token_table is not None:
            return self.token_table[token_ids]
        return F.linear(self.embed[token_ids].to(self.dtype), self.token_w, self.fc_bias)

    def _rope(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, ...]:
        """cos, sin [n, Dh] of ``positions`` (< ``max_position``), from tables grown on demand."""
        if max_position > self._cos.shape[0]:
            size = max(2 * self._cos.shape[0], max_position, 256)
            self._cos, self._sin = self.rotary(torch.arange(size, device=self.device), self.dtype)
        return self._cos[positions], self._sin[positions]

    def _column_positions(self, size: int) -> torch.Tensor:
        """[size] column c's position c, but column 0's beyond every position."""
        if size > self._columns.shape[0]:
            columns = torch.arange(max(2 * self._columns.shape[0], size, 256), device=self.device)
            columns[0] = torch.iinfo(torch.long).max
            self._columns = columns
        return self._columns[:size]

    def _additive(self, blocked: torch.Tensor) -> torch.Tensor:
        """0 where attention is allowed, -inf where ``blocked`` (one op)."""
        return torch.where(blocked, self._blocked, self._open)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The draft layer: x [n, D] -> h [n, D]. ``attend(q [n, H, Dh], k [n, K, Dh], v)``
        writes this step's k / v where they belong and returns attention [n, H * Dh]."""
        n = x.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, *self.qkv)  # [n, (H + 2K) Dh]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rotary(qk.view(n, heads + kv_heads, dim), cos, sin)
        q, k = qk.split([heads, kv_heads], dim=-2)  # [n, H, Dh], [n, K, Dh]
        x = x + F.linear(attend(q, k, v.view(n, kv_heads, dim)), *self.o)
        if x.dtype == torch.float32:
            normed = F.rms_norm(x, (x.shape[-1],), self.post_norm, self.norm_eps)
        else:  # as RMSNorm does: normalize in fp32, cast back, then the weight
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.norm_eps).to(x.dtype)
            normed = normed * self.post_norm
        gate, up = F.linear(normed, *self.gate_up).split(self.intermediate_size, dim=-1)
        return x + F.linear(F.silu(gate) * up, *self.down)  # [n, D]

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [R, n, H, Dh] over k, v [R, L, K, Dh] under mask [R, 1, n, L] -> [R * n, H * Dh]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [R, H, n, Dh]
        return out.transpose(1, 2).reshape(-1, self.q_size)

    def top_k(self, hidden: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """The k likeliest next tokens after each h [M, D]: draft log-probabilities and token
        ids, [M][k] each, over the draft vocabulary when the head has one."""
        logp = F.linear(hidden, self.draft_logits).float().log_softmax(-1)  # [M, Vd]
        vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ids = idx.tolist()
        if self.draft_vocab is not None:
            vocab = self.draft_vocab
            ids = [[vocab[i] for i in row] for row in ids]
        return vals.tolist(), ids

    # ---- the step ----------------------------------------------------------------------------

    def catch_up(
        self, batch: CatchUpBatch, features: torch.Tensor, draft_columns: int
    ) -> tuple[torch.Tensor, DraftContext]:
        """Write the head entries of ``batch`` (features [N, E]: the target's at each entry's
        position - 1) and gather every request's context, with ``draft_columns`` free columns
        for its tree. Returns the entries' h [N, D] and the context."""
        bs, device = self.block_size, self.device
        num_requests = len(batch.context_lens)
        max_blocks = max(len(t) for t in batch.block_tables)
        tables = self._tensor([t + [0] * (max_blocks - len(t)) for t in batch.block_tables])
        committed = max_blocks * bs
        lens = self._tensor(batch.context_lens)
        cols = self._column_positions(committed)
        mask = self._additive(cols >= lens[:, None])  # [R, C]
        if draft_columns:  # open: a chain's node sees every node drafted before it
            mask = torch.cat((mask, mask.new_zeros(num_requests, draft_columns)), dim=-1)
        mask = mask[:, None, None, :]  # [R, 1, 1, C + S]
        context: DraftContext | None = None

        def gather() -> DraftContext:
            shape = (num_requests, committed + draft_columns, self.num_kv_heads, self.head_dim)
            # NOTE: zeros, not empty: a masked column still enters attention's product with
            # V, and garbage there could be NaN (0 x NaN = NaN).
            k = torch.zeros(shape, dtype=self.dtype, device=device)
            v = torch.zeros(shape, dtype=self.dtype, device=device)
            flat = tables.flatten()
            for buf, cache in ((k, self.kv[0]), (v, self.kv[1])):
                blocks = cache.view(-1, bs, self.num_kv_heads, self.head_dim)
                buf[:, :committed] = blocks.index_select(0, flat).view(
                    num_requests, committed, *buf.shape[2:]
                )
            return DraftContext(k, v, mask, committed)

        if not batch.token_ids:
            width = self.parent_in.shape[0]
            return torch.empty(0, width, dtype=self.dtype, device=device), gather()
        token_ids = self._tensor(batch.token_ids)
        positions = self._tensor(batch.positions)
        slots = self._tensor(batch.slots)
        x = self._token_rows(token_ids) + F.linear(features, self.feature_in)  # [N, D]
        cos, sin = self._rope(positions, max(batch.positions) + 1)
        # Queries padded to the longest request's rows (a padded row repeats a real one).
        counts = [b - a for a, b in zip(batch.row_starts, batch.row_starts[1:], strict=False)]
        longest = max(counts)
        padded = any(c != longest for c in counts)
        if padded:
            rows = [
                a + min(i, c - 1) if c else 0
                for a, c in zip(batch.row_starts, counts, strict=False)
                for i in range(longest)
            ]
            pad_index = self._tensor(rows)
            keep = self._tensor([r * longest + i for r, c in enumerate(counts) for i in range(c)])

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            nonlocal context
            self.kv[0][slots] = k
            self.kv[1][slots] = v
            context = gather()
            qpos = positions
            if padded:
                q, qpos = q.index_select(0, pad_index), positions.index_select(0, pad_index)
            q = q.view(num_requests, longest, self.num_heads, self.head_dim)
            causal = self._additive(cols > qpos.view(num_requests, longest, 1))  # [R, n, C]
            k, v = context.k[:, :committed], context.v[:, :committed]
            out = self._attention(q, k, v, causal[:, None])
            return out.index_select(0, keep) if padded else out  # [N, H * Dh]

        hidden = self._layer(x, cos, sin, attend)
        assert context is not None
        return hidden, context

    def expand(
        self,
        context: DraftContext,
        parents: torch.Tensor,
        token_ids: list[int],
        positions: list[int],
        width: int,
        first_column: int,
        ancestors: list[list[int]] | None,
    ) -> torch.Tensor:
        """One depth of the tree for the first n requests of ``context``, ``width`` nodes each
        (row r * width + i; pad with copies of a real node).

        parents [n * W, D]: each node's parent h; positions [n * W]; node i of a request
        writes its K/V to draft column ``first_column + i``. ``ancestors[row]``: the draft
        columns the node attends (its expanded ancestors and itself); None: all columns up to
        its own (a chain). Returns the nodes' h [n * W, D].
        """
        rows = len(token_ids)
        n = rows // width
        c = context.num_committed
        end = c + first_column + width
        x = self._token_rows(self._tensor(token_ids)) + F.linear(parents, self.parent_in)
        cos, sin = self._rope(self._tensor(positions), max(positions) + 1)
        drafted = first_column + width
        if ancestors is None:
            assert width == 1, "only a chain's nodes attend every draft column"
            mask = context.mask[:n, :, :, :end]  # [n, 1, 1, C + drafted]
        else:
            blocked = [[col not in a for col in range(drafted)] for a in ancestors]
            draft_mask = self._additive(torch.tensor(blocked, device=self.device))
            mask = torch.cat(
                (
                    context.mask[:n, :, :, :c].expand(n, 1, width, c),
                    draft_mask.view(n, 1, width, -1),
                ),
                dim=-1,
            )  # [n, 1, W, C + drafted]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cols = slice(c + first_column, end)
            context.k[:n, cols] = k.view(n, width, self.num_kv_heads, self.head_dim)
            context.v[:n, cols] = v.view(n, width, self.num_kv_heads, self.head_dim)
            q = q.view(n, width, self.num_heads, self.head_dim)
            return self._attention(q, context.k[:n, :end], context.v[:n, :end], mask)

        return self._layer(x, cos, sin, attend)  # [n * W, D]
