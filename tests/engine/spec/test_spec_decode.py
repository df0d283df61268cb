"""EAGLE speculative decoding: greedy output equals plain greedy decoding token for token; the
sampling rule keeps the target's distribution; KV of rejected drafts never reaches the cache."""

from __future__ import annotations

import random

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import AcceptanceTracker
from raycake.engine.spec.tree import DraftTree, verify_greedy, verify_sampling
from raycake.model.eagle import EagleDraftHead, load_eagle_head, save_eagle_head
from raycake.model.loader import read_model_config
from tests.llama_checkpoints import CONFIGS, build_checkpoint, build_mixtral_checkpoint


@pytest.fixture(scope="module", params=CONFIGS[:2], ids=lambda s: s.name)
def checkpoint(request, tmp_path_factory):
    """(target folder, random EAGLE head folder)."""
    out = tmp_path_factory.mktemp(request.param.name)
    build_checkpoint(request.param, out / "target")
    torch.manual_seed(3)
    save_eagle_head(EagleDraftHead(read_model_config(out / "target")), out / "head")
    return out / "target", out / "head"


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, 320) for _ in range(rng.randrange(1, 22))] for _ in range(n)]


def _llm(target, head=None, **spec) -> LLM:
    speculative = None
    if head is not None:
        speculative = SpeculativeConfig(draft_model=str(head), **spec)
    return LLM(str(target), block_size=4, max_num_seqs=8, speculative=speculative)


def _generate(llm: LLM, prompts, params) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params)]


def test_random_head_greedy_equals_plain(checkpoint) -> None:
    target, head = checkpoint
    prompts = _prompts(12)
    params = [
        SamplingParams(temperature=0, max_tokens=4 + i % 9, ignore_eos=True) for i in range(12)
    ]
    plain = _generate(_llm(target), prompts, params)
    spec_llm = _llm(target, head, num_draft_tokens=6, tree_top_k=3, max_depth=3)
    assert _generate(spec_llm, prompts, params) == plain
    stats = spec_llm.engine.spec_stats()
    assert stats.num_verify_steps > 0 and stats.mean_acceptance_length >= 1.0
    spec_llm.engine.scheduler.check_invariants()


class _OracleDraft:
    """Drafts trees that contain the true greedy continuation beside wrong siblings, so several
    tokens are accepted per step and accepted nodes sit away from their final slots."""

    def __init__(self, runner, continuations: dict[tuple[int, ...], list[int]], seed: int) -> None:
        self.runner = runner
        self.continuations = continuations
        self.rng = random.Random(seed)

    def true_next(self, token_ids: list[int]) -> list[int]:
        for prompt, full in self.continuations.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                return full[len(token_ids) :]
        raise AssertionError("unknown sequence")

    def __call__(self, budgets: dict[str, int]) -> dict[str, DraftTree]:
        trees = {}
        for rid, budget in budgets.items():
            truth = self.true_next(self.runner.requests[rid].token_ids)
            depth = min(budget // 2, len(truth), self.rng.randrange(0, 5))
            tokens, parents, depths = [], [], []
            parent = -1
            for d in range(depth):
                wrong = (truth[d] + 1 + self.rng.randrange(300)) % 320
                # A wrong sibling first half the time, so the true node's index != d.
                pair = [wrong, truth[d]] if self.rng.random() < 0.5 else [truth[d], wrong]
                for tok in pair:
                    tokens.append(tok)
                    parents.append(parent)
                    depths.append(d + 1)
                parent = len(tokens) - 1 - pair[::-1].index(truth[d])
            if self.rng.random() < 0.3 and 2 * depth < budget:  # a chain that is wrong at its end
                tokens.append((truth[depth] + 7) % 320 if depth < len(truth) else 5)
                parents.append(parent)
                depths.append(depth + 1)
            trees[rid] = _reorder(tokens, parents, depths)
        return trees


def _reorder(tokens, parents, depths) -> DraftTree:
    order = sorted(range(len(tokens)), key=lambda i: (depths[i], i))
    new = {old: i for i, old in enumerate(order)}
    return DraftTree(
        [tokens[i] for i in order],
        [-1 if parents[i] < 0 else new[parents[i]] for i in order],
        [depths[i] for i in order],
    )


def test_oracle_drafts_accept_many_tokens_and_roll_back_kv(checkpoint) -> None:
    """Many tokens accepted per step, wrong branches rolled back; the output and the prefix
    cache (prompts that extend earlier outputs hit blocks written by verify steps) stay exact."""
    target, head = checkpoint
    prompts = _prompts(10, seed=1)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain_llm = _llm(target)
    full = {
        tuple(p): p + out
        for p, out in zip(prompts, _generate(plain_llm, prompts, long), strict=True)
    }
    spec_llm = _llm(target, head, num_draft_tokens=10)
    spec_llm.engine.runner._draft = _OracleDraft(spec_llm.engine.runner, full, seed=2)
    params = [
        SamplingParams(temperature=0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(10)
    ]
    expected = [
        full[tuple(p)][len(p) : len(p) + s.max_tokens] for p, s in zip(prompts, params, strict=True)
    ]
    outs = spec_llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert spec_llm.engine.spec_stats().mean_acceptance_length > 2.0
    assert max(max(o.metrics.spec_acceptance_lengths) for o in outs) >= 4
    # Second round: prompts that extend the first outputs reuse blocks committed by verify steps.
    extended = [full[tuple(p)][: len(p) + 9] for p in prompts]
    full2 = {tuple(e): full[tuple(p)] for e, p in zip(extended, prompts, strict=True)}
    spec_llm.engine.runner._draft.continuations = full2
    hits_before = spec_llm.engine.stats().prefix_cache_hits
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = _generate(spec_llm, extended, short)
    assert spec_llm.engine.stats().prefix_cache_hits > hits_before
    assert got == [
        full[tuple(p)][len(e) : len(e) + 8] for p, e in zip(prompts, extended, strict=True)
    ]
    assert got == _generate(plain_llm, extended, short)
    spec_llm.engine.scheduler.check_invariants()


def test_stop_conditions_hold_within_one_verify_step(checkpoint) -> None:
    target, head = checkpoint
    prompts = _prompts(6, seed=4)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain_llm = _llm(target)
    outs = _generate(plain_llm, prompts, long)
    full = {tuple(p): p + o for p, o in zip(prompts, outs, strict=True)}
    # Stop on a token the plain output produces mid-way (likely inside an accepted run).
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[o[5 + i]])
        for i, o in enumerate(outs)
    ]
    spec_llm = _llm(target, head, num_draft_tokens=10)
    spec_llm.engine.runner._draft = _OracleDraft(spec_llm.engine.runner, full, seed=5)
    got = spec_llm.generate(prompts, params)
    want = plain_llm.generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.outputs[0].finish_reason for g in got] == ["stop"] * len(prompts)


def test_sampling_through_the_engine(checkpoint) -> None:
    """Seeded sampling with a random head runs, is reproducible, and reports acceptance."""
    target, head = checkpoint
    prompts = _prompts(4, seed=6)
    params = [SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=12) for i in range(4)]
    runs = []
    for _ in range(2):
        llm = _llm(target, head, num_draft_tokens=4, tree_top_k=2, max_depth=2)
        outs = llm.generate(prompts, params)
        runs.append([o.token_ids for o in outs])
        assert all(o.metrics.spec_acceptance_lengths for o in outs)
        assert llm.engine.spec_stats().acceptance_lengths == {}  # moved into the outputs
    assert runs[0] == runs[1]
    assert all(0 <= t < 320 for out in runs[0] for t in out)


def test_verify_greedy_follows_the_argmax() -> None:
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 1, 1], [1, 1, 2, 2])
    logits = torch.full((5, 10), -5.0)
    logits[0, 6] = 1  # root -> node 1 (token 6)
    logits[2, 8] = 1  # node 1 -> node 3 (token 8)
    logits[4, 2] = 1  # bonus after node 3
    verdict = verify_greedy(tree, logits)
    assert verdict.accepted_nodes == [1, 3] and verdict.emitted(tree) == [6, 8, 2]


def test_speculative_sampling_keeps_the_target_distribution() -> None:
    """On a 4-token vocabulary, the first two emitted tokens are distributed as the target's
    (two-token joint distribution, total variation < 0.02 over 20,000 draws)."""
    vocab = 4
    gen = torch.Generator().manual_seed(0)
    # Tree: root children tokens 0 and 2; node 0 has children 1 and 3.
    tree = DraftTree([0, 2, 1, 3], [-1, -1, 0, 0], [1, 1, 2, 2])
    probs = torch.softmax(torch.randn(5, vocab, generator=gen), -1)  # [root + nodes, V]
    # The target's next-token distribution after each first token (rows where known).
    after = {0: probs[1], 2: probs[2]}
    second_rows = {t: after.get(t, probs[1]) for t in range(vocab)}
    counts = torch.zeros(vocab, vocab)
    draws = 20_000
    for _ in range(draws):
        # Each draw: token after a path not in the tree uses a fresh target pass in reality;
        # here the second token comes from the bonus when only one token was emitted.
        verdict = verify_sampling(tree, probs, gen)
        emitted = verdict.emitted(tree)
        first = emitted[0]
        second = (
            emitted[1]
            if len(emitted) > 1
            else int(torch.multinomial(second_rows[first], 1, generator=gen))
        )
        counts[first, second] += 1
    want = probs[0][:, None] * torch.stack([second_rows[t] for t in range(vocab)])
    tv = 0.5 * (counts / draws - want).abs().sum()
    assert tv < 0.02, (tv, counts / draws, want)


def test_head_catches_up_after_steps_without_drafts(checkpoint) -> None:
    """A request the policy gives no drafts for a few steps runs no head forward then; when it
    drafts again the head catches up in one forward, to the same root feature as a head that
    ran every step (compared wherever both drafted at the same sequence)."""
    target, head = checkpoint
    prompts = _prompts(5, seed=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = _generate(_llm(target), prompts, params)
    roots: list[dict[tuple[int, ...], torch.Tensor]] = []
    for every in (1, 3):  # draft every step; every third step
        llm = _llm(target, head, num_draft_tokens=4, tree_top_k=2, max_depth=2)
        runner, scheduler = llm.engine.runner, llm.engine.scheduler
        seen: dict[tuple[int, ...], torch.Tensor] = {}
        draft, budget, steps = runner._draft, scheduler.draft_budget, [0]

        def record(budgets, runner=runner, seen=seen, draft=draft):
            for rid in budgets:
                key = tuple(runner.requests[rid].token_ids)
                seen[key] = runner.head_states[rid].root_feature.clone()
            return draft(budgets)

        def every_nth(request_ids, budget=budget, steps=steps, every=every):
            steps[0] += 1
            wanted = budget(request_ids)
            return wanted if steps[0] % every == 0 else dict.fromkeys(wanted, 0)

        runner._draft, scheduler.draft_budget = record, every_nth
        assert _generate(llm, prompts, params) == plain
        roots.append(seen)
    common = roots[0].keys() & roots[1].keys()
    assert len(common) >= 10
    for key in common:
        torch.testing.assert_close(roots[1][key], roots[0][key], rtol=1e-4, atol=1e-4)


def test_adaptive_policy_is_lossless_and_learns(checkpoint) -> None:
    """The adaptive policy decides each step from what the runner reports: acceptance per
    request (forgotten when it finishes) and the measured target and draft step times."""
    target, head = checkpoint
    prompts = _prompts(6, seed=9)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain_llm = _llm(target)
    outs = _generate(plain_llm, prompts, long)
    full = {tuple(p): p + o for p, o in zip(prompts, outs, strict=True)}
    llm = _llm(target, head, policy="adaptive", num_draft_tokens=4, max_depth=4)
    llm.engine.runner._draft = _OracleDraft(llm.engine.runner, full, seed=10)
    controller = llm.engine.spec_controller
    # A confident prior, so the policy drafts before it has measured anything (this test
    # model's head costs half its target: at the default prior it would rightly never draft).
    controller.tracker = AcceptanceTracker(prior_rate=0.95)
    assert _generate(llm, prompts, long) == outs
    assert controller.policy.name == "adaptive" and controller.num_steps > 0
    assert controller.target_timing.mean_seconds > 0
    assert len(controller.tracker) == 0  # every finished request forgotten
    stats = llm.engine.spec_stats()
    assert stats.num_verify_steps > 0 and stats.estimated_speedup > 0
    assert set(controller.metrics()) >= {"spec_draft_tokens", "spec_policy_steps"}


def test_moe_target_greedy_equals_plain(tmp_path) -> None:
    """A Mixtral target (MoE layers, top-2 routing) with a dense EAGLE head: lossless too."""
    build_mixtral_checkpoint(tmp_path / "target", 4, vocab_size=320)
    torch.manual_seed(4)
    save_eagle_head(EagleDraftHead(read_model_config(tmp_path / "target")), tmp_path / "head")
    prompts = _prompts(6, seed=11)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = _generate(_llm(tmp_path / "target"), prompts, params)
    spec_llm = _llm(tmp_path / "target", tmp_path / "head", num_draft_tokens=6, max_depth=3)
    assert _generate(spec_llm, prompts, params) == plain
    assert spec_llm.engine.spec_stats().num_verify_steps > 0


def test_drafts_come_from_the_heads_draft_vocabulary(checkpoint, tmp_path) -> None:
    """A head with a draft vocabulary proposes only those tokens; the output stays exact."""
    target, head_dir = checkpoint
    head = load_eagle_head(head_dir)
    vocab = list(range(0, 320, 3))
    head.set_draft_vocab(vocab)
    save_eagle_head(head, tmp_path / "head")
    prompts = _prompts(6, seed=12)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = _generate(_llm(target), prompts, params)
    llm = _llm(target, tmp_path / "head", num_draft_tokens=6, tree_top_k=3, max_depth=3)
    runner, drafted = llm.engine.runner, []
    draft = runner._draft

    def record(budgets):
        trees = draft(budgets)
        drafted.extend(t for tree in trees.values() for t in tree.token_ids)
        return trees

    runner._draft = record
    assert _generate(llm, prompts, params) == plain
    assert drafted and set(drafted) <= set(vocab)
    with pytest.raises(ValueError, match="tree_top_k: 4 exceeds the head's draft vocabulary"):
        head.set_draft_vocab([1, 2, 3])
        save_eagle_head(head, tmp_path / "small")
        _llm(target, tmp_path / "small", tree_top_k=4)
