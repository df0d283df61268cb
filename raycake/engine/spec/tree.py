"""Speculative decoding's data and rules: draft trees, tree attention, acceptance, statistics.

A step of a speculating request feeds the target its last committed token (the root, at
position N - 1) and the nodes of a draft tree; node i sits at position N - 1 + depth(i) and in
cache slot ``num_computed + 1 + i``, and attends the committed prefix, its ancestors and itself.
Verification walks the tree from the root and returns the accepted path plus one token of the
target's own (the bonus), so a step emits between 1 and max_depth + 1 tokens.

Legend: n tree nodes (root excluded), V vocabulary, C context (committed tokens + root + nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raycake.engine.sampler import apply_top_k_top_p
from raycake.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class DraftTree:
    """A request's draft tokens. NOTE: nodes are in depth order, so a parent precedes its children."""

    token_ids: list[int]  # [n] the draft token of each node
    parents: list[int]  # [n] index of each node's parent; -1 for a child of the root
    depths: list[int]  # [n] 1 for a child of the root

    def __post_init__(self) -> None:
        for i, (parent, depth) in enumerate(zip(self.parents, self.depths, strict=True)):
            expected = 1 if parent < 0 else self.depths[parent] + 1
            if parent >= i or depth != expected:
                raise ValueError(f"node {i}: parent {parent} and depth {depth} do not form a tree")

    @property
    def num_nodes(self) -> int:
        return len(self.token_ids)

    def children(self) -> list[list[int]]:
        """Children of the root (entry 0) and of each node (entry i + 1), in node order."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for i, parent in enumerate(self.parents):
            kids[parent + 1].append(i)
        return kids

    def ancestor_mask(self, device: torch.device | str) -> torch.Tensor:
        """[1 + n, 1 + n] bool on ``device``: row r may attend column c (root = 0, node i =
        i + 1). Built as lists and sent in one copy: row by row on an accelerator would cost
        a kernel launch per node."""
        size = self.num_nodes + 1
        rows = [[False] * size for _ in range(size)]
        rows[0][0] = True
        for i, parent in enumerate(self.parents):
            rows[i + 1] = list(rows[parent + 1])
            rows[i + 1][i + 1] = True
        return torch.tensor(rows, dtype=torch.bool, device=device)


def select_tree(
    token_ids: list[int], parents: list[int], depths: list[int], scores: list[float], budget: int
) -> DraftTree:
    """EAGLE-2 reranking: keep the ``budget`` candidates of highest cumulative log-probability.

    Candidates must come parents first. A child scores at most its parent (log-probabilities
    are <= 0), and ties go to the shallower node, so the kept set contains every ancestor.
    """
    order = sorted(range(len(token_ids)), key=lambda i: (-scores[i], depths[i], i))[:budget]
    kept = sorted(order, key=lambda i: (depths[i], i))
    new_index = {old: new for new, old in enumerate(kept)}
    return DraftTree(
        token_ids=[token_ids[i] for i in kept],
        parents=[-1 if parents[i] < 0 else new_index[parents[i]] for i in kept],
        depths=[depths[i] for i in kept],
    )


def tree_attention_mask(
    tree: DraftTree, num_committed: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """[1 + n, C] additive mask of a verify span, on ``device``: root and nodes over the
    committed prefix.

    ``num_committed`` is the root's position (N - 1): tokens before it are in the cache.
    """
    size = (tree.num_nodes + 1, num_committed + tree.num_nodes + 1)
    allowed = torch.ones(size, dtype=torch.bool, device=device)
    allowed[:, num_committed:] = tree.ancestor_mask(device)
    zeros = torch.zeros(size, dtype=dtype, device=device)
    return zeros.masked_fill_(~allowed, float("-inf"))


@dataclass(frozen=True)
class Verdict:
    """What verification kept: the accepted path (node indices, root to leaf) and the bonus."""

    accepted_nodes: list[int]
    bonus_token_id: int

    def emitted(self, tree: DraftTree) -> list[int]:
        return [tree.token_ids[i] for i in self.accepted_nodes] + [self.bonus_token_id]


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    """Follow the target's argmax through the tree. logits: [1 + n, V] (root first).

    NOTE: lossless by construction: every emitted token is the target's argmax after the
    tokens before it, which is what plain greedy decoding emits.
    """
    best = logits.argmax(dim=-1).tolist()  # [1 + n]
    kids = tree.children()
    path: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in kids[row] if tree.token_ids[c] == best[row]), None)
        if nxt is None:
            return Verdict(path, best[row])
        path.append(nxt)
        row = nxt + 1


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[rows, V] logits -> the distributions plain sampling draws from under ``params``."""
    rows = [
        apply_top_k_top_p(row / params.temperature, params.top_k, params.top_p) for row in logits
    ]
    return torch.stack(rows).softmax(-1)


def verify_sampling(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None
) -> Verdict:
    """Speculative sampling over a tree whose children are deterministic (top-k) drafts.

    probs: [1 + n, V] the target's distribution at the root and at each node. A draft chosen
    deterministically has draft distribution q = one-hot, so the standard rule (accept x with
    probability min(1, p(x) / q(x)), else resample from normalize(max(p - q, 0))) reads: accept
    child c with probability p(c); on rejection remove c from p, renormalize, try the next child;
    when all children are rejected, draw the bonus from what is left. The emitted token is then
    distributed exactly as p (sequential sampling without replacement), at every depth.
    """
    kids = tree.children()
    path: list[int] = []
    row = 0
    p = probs[row].clone()
    while True:
        accepted = None
        for child in kids[row]:
            token = tree.token_ids[child]
            u = torch.rand((), generator=generator, device=p.device)
            if u < p[token]:
                accepted = child
                break
            p[token] = 0.0
            total = p.sum()
            if total <= 0:  # only rejected drafts had mass: cannot happen for exact p
                break
            p /= total
        if accepted is None:
            token = int(torch.multinomial(p, 1, generator=generator).item())
            return Verdict(path, token)
        path.append(accepted)
        row = accepted + 1
        p = probs[row].clone()


@dataclass
class SpecDecodeStats:
    """Engine-level totals since start (counters; subtract two reads for a window)."""

    num_verify_steps: int = 0  # request-steps that verified a draft tree (one target pass each)
    num_draft_tokens: int = 0  # draft tree nodes verified
    num_accepted_tokens: int = 0  # of those, accepted
    num_emitted_tokens: int = 0  # accepted + bonus tokens of verify steps
    draft_seconds: float = 0.0  # head forwards: drafting trees and keeping the head's KV current
    target_seconds: float = 0.0  # target forward passes and verification
    # Steps with at least one tree: their seconds, the tokens they emitted (every request of
    # the step), the tokens plain decoding would have emitted (one per sampling request), and
    # the seconds plain steps would have taken by the fitted cost model (speedup estimate).
    verify_step_seconds: float = 0.0
    verify_step_tokens: int = 0
    plain_step_tokens: int = 0
    plain_step_seconds: float = 0.0
    # Per request in flight: tokens emitted by each of its verify steps (accepted + 1), and
    # [step seconds, estimated plain step seconds] summed over them; the engine moves a
    # finished request's entries into its RequestMetrics.
    acceptance_lengths: dict[str, list[int]] = field(default_factory=dict)
    request_seconds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per target pass of a speculating request (1.0 = no gain)."""
        return self.num_emitted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over verified drafts."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def draft_time_share(self) -> float:
        total = self.draft_seconds + self.target_seconds
        return self.draft_seconds / total if total else 0.0

    @property
    def estimated_speedup(self) -> float:
        """Tokens per second of the verify steps over plain decoding's for the same requests,
        plain steps timed by the fitted cost model (0.0 before any verify step)."""
        if not self.verify_step_seconds or not self.plain_step_tokens:
            return 0.0
        spec_rate = self.verify_step_tokens / self.verify_step_seconds
        return spec_rate / (self.plain_step_tokens / self.plain_step_seconds)

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The totals between two reads (per-request entries are not windowed: left empty)."""
        return SpecDecodeStats(
            **{name: getattr(self, name) - getattr(earlier, name) for name in WINDOWED_FIELDS}
        )


WINDOWED_FIELDS = (
    "num_verify_steps",
    "num_draft_tokens",
    "num_accepted_tokens",
    "num_emitted_tokens",
    "draft_seconds",
    "target_seconds",
    "verify_step_seconds",
    "verify_step_tokens",
    "plain_step_tokens",
    "plain_step_seconds",
)
