"""EAGLE speculative decoding: greedy output equals plain greedy decoding token for token; the
shipped head drafts what the embedded model accepts on held-out text; the sampling rule keeps
the target's distribution exactly; KV of rejected drafts never reaches the cache; the adaptive
policy learns from its default prior when drafting pays."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import raycake.engine.spec.tree as tree_module
from benchmarks.common import held_out_prompts
from raycake import LLM, SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.controller import AcceptanceTracker, SpeculationController
from raycake.engine.spec.tree import DraftTree, verify_greedy, verify_sampling
from raycake.model.eagle import EagleDraftHead, load_eagle_head, save_eagle_head
from raycake.model.loader import read_model_config
from raycake.policies.speculation import tree_shape
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
    # Every verify step emits its accepted drafts plus the target's own token.
    assert stats.num_verify_steps > 0
    assert stats.num_emitted_tokens == stats.num_accepted_tokens + stats.num_verify_steps
    assert stats.num_draft_tokens <= 6 * stats.num_verify_steps
    spec_llm.engine.scheduler.check_invariants()


def test_shipped_head_is_accepted_on_held_out_text() -> None:
    """The embedded model with its shipped EAGLE head, greedy, on four held-out 128-token
    stdlib prompts (never trained on; benchmarks/spec_decode.py's prompts), 64 new tokens.

    Measured with the narrow head (deterministic: greedy, fixed prompts): chain of 4 at depth
    4, 3.57 tokens per target pass, 66% of drafts accepted; EAGLE tree (12 nodes, depth 6,
    top-4) 4.90 (the full-width head it replaced: 3.76, 71%, 4.92). A head that drafts noise
    gets ~1.0; a verification that accepted every draft would give 5.0 on the chain and differ
    from plain decoding."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    plain = LLM("default")
    prompts = held_out_prompts(plain.tokenizer, 4, 128)
    expected = _generate(plain, prompts, params)
    stats = {}
    for name, spec in (
        ("chain", SpeculativeConfig(draft_model="default", num_draft_tokens=4, max_depth=4)),
        (
            "tree",
            SpeculativeConfig(
                draft_model="default", num_draft_tokens=12, max_depth=6, tree_top_k=4
            ),
        ),
    ):
        llm = LLM("default", speculative=spec)
        assert _generate(llm, prompts, params) == expected
        stats[name] = llm.engine.spec_stats()
    chain, tree = stats["chain"], stats["tree"]
    assert 3.0 <= chain.mean_acceptance_length <= 4.6, chain.mean_acceptance_length
    assert 0.6 <= chain.acceptance_rate <= 0.85, chain.acceptance_rate
    assert tree.mean_acceptance_length >= 4.2, tree.mean_acceptance_length
    assert tree.mean_acceptance_length > chain.mean_acceptance_length + 0.5


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

    def __call__(self, budgets: dict[str, int], context=None) -> dict[str, DraftTree]:
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


class _Branch(Exception):
    """An unscripted random draw: its outcomes and their exact probabilities."""

    def __init__(self, options: list[tuple[object, float]]) -> None:
        self.options = options


class _ScriptedTorch:
    """Stands in for ``torch`` inside ``raycake.engine.spec.tree`` so that verify_sampling's
    random draws are enumerated instead of sampled: the draws of a script are replayed, and the
    first draw past it raises ``_Branch`` with every outcome and its probability as the rule set
    it up: a uniform u compared with ``u < x`` is below x with probability x (the comparison
    reads x off the code, whatever it computed), and ``multinomial(w, 1)`` returns token t with
    probability w[t] / sum(w). Everything else is torch."""

    def __init__(self, script: tuple) -> None:
        self.script, self.used = script, 0

    def _draw(self, options: list[tuple[object, float]]) -> object:
        if self.used == len(self.script):
            raise _Branch(options)
        self.used += 1
        return self.script[self.used - 1]

    def rand(self, *args, **kwargs) -> _Uniform:
        return _Uniform(self)

    def multinomial(self, weights: torch.Tensor, num_samples: int, generator=None):
        assert num_samples == 1
        probs = (weights.double() / weights.double().sum()).tolist()
        return torch.tensor([self._draw([(t, q) for t, q in enumerate(probs) if q > 0])])

    def __getattr__(self, name: str):
        return getattr(torch, name)


class _Uniform:
    def __init__(self, source: _ScriptedTorch) -> None:
        self.source = source

    def __lt__(self, threshold) -> bool:
        x = min(max(float(threshold), 0.0), 1.0)
        return bool(self.source._draw([(True, x), (False, 1.0 - x)]))


def _exact_outcomes(run, monkeypatch, max_runs: int = 20_000) -> dict[tuple, float]:
    """Every outcome of ``run()`` with its exact probability, by walking the tree of random
    draws depth first (each path replayed from the start with a script of its draws)."""
    outcomes: dict[tuple, float] = {}
    stack: list[tuple[tuple, float]] = [((), 1.0)]
    for _ in range(max_runs):
        if not stack:
            return outcomes
        script, prob = stack.pop()
        monkeypatch.setattr(tree_module, "torch", _ScriptedTorch(script))
        try:
            result = run()
        except _Branch as branch:
            stack += [((*script, c), prob * q) for c, q in branch.options if q > 0]
            continue
        finally:
            monkeypatch.setattr(tree_module, "torch", torch)
        outcomes[result] = outcomes.get(result, 0.0) + prob
    raise AssertionError(f"more than {max_runs} paths: the rule does not terminate")


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch) -> None:
    """Three tokens generated by verify steps on a 4-token vocabulary: their joint distribution,
    computed exactly by enumerating every accept / reject / residual draw of verify_sampling
    with its probability, equals the target's, cell by cell.

    Each step drafts a tree for the tokens so far (two children of the root, two under the
    first: accepted, rejected, a deeper run and a bonus after rejections all occur) and
    verifies it against the target's distribution at the root and every node; steps repeat
    until three tokens are out, so every token comes through the rule. A broken rule (no
    renormalisation after a rejection, or the bonus drawn from the unreduced distribution)
    moves cells by 0.06-0.14 here."""
    vocab, length = 4, 3
    gen = torch.Generator().manual_seed(0)
    # The target's next-token distribution after each prefix (sharp and flat rows alike).
    target = {
        prefix: torch.softmax(2 * torch.randn(vocab, generator=gen), -1)
        for n in range(length + 2)
        for prefix in itertools.product(range(vocab), repeat=n)
    }

    def draft(prefix: tuple[int, ...]) -> DraftTree:
        first = (7 * sum(prefix) + 3 * len(prefix)) % vocab
        second = (first + 1 + len(prefix) % 3) % vocab
        return DraftTree(
            [first, second, (first + 2) % vocab, (first + 3) % vocab], [-1, -1, 0, 0], [1, 1, 2, 2]
        )

    def probs(tree: DraftTree, prefix: tuple[int, ...]) -> torch.Tensor:
        """[1 + n, V]: the target at the root and after each node's path."""
        rows, paths = [target[prefix]], []
        for token, parent in zip(tree.token_ids, tree.parents, strict=True):
            paths.append((paths[parent] if parent >= 0 else prefix) + (token,))
            rows.append(target[paths[-1]])
        return torch.stack(rows)

    def generate() -> tuple[int, ...]:
        out: tuple[int, ...] = ()
        while len(out) < length:
            tree = draft(out)
            out += tuple(verify_sampling(tree, probs(tree, out), None).emitted(tree))
        return out[:length]

    got = _exact_outcomes(generate, monkeypatch)
    assert len(got) == vocab**length and sum(got.values()) == pytest.approx(1.0, abs=1e-6)
    for seq in itertools.product(range(vocab), repeat=length):
        want = 1.0
        for i, token in enumerate(seq):
            want *= float(target[seq[:i]][token])
        assert got[seq] == pytest.approx(want, abs=1e-6), seq


def test_sampling_rule_takes_a_sure_draft_and_skips_an_impossible_one(monkeypatch) -> None:
    """Deterministic corners: a draft with target probability 1 is always accepted; one with
    probability 0 never is, and the bonus then has the target's distribution."""
    tree = DraftTree([2, 1], [-1, 0], [1, 2])
    sure = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.25, 0.25, 0.5]])
    got = _exact_outcomes(
        lambda: tuple(verify_sampling(tree, sure, None).emitted(tree)), monkeypatch
    )
    assert got == {(2, 2): pytest.approx(1.0)}  # token 2, then draft 1 refused, bonus 2
    never = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    got = _exact_outcomes(
        lambda: tuple(verify_sampling(tree, never, None).emitted(tree)), monkeypatch
    )
    assert got == {(0,): pytest.approx(0.5), (1,): pytest.approx(0.5)}


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

        def record(budgets, context, runner=runner, seen=seen, draft=draft):
            for rid in budgets:
                key = tuple(runner.requests[rid].token_ids)
                seen[key] = runner.head_states[rid].root_feature.clone()
            return draft(budgets, context)

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


def test_adaptive_policy_is_lossless(checkpoint) -> None:
    """Budgets that change every step (the adaptive policy, drafting from a confident prior:
    this test model's head costs half its target, so measured costs would soon stop it) keep
    the output exact, and the per-request acceptance is forgotten when requests finish."""
    target, head = checkpoint
    prompts = _prompts(6, seed=9)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain_llm = _llm(target)
    outs = _generate(plain_llm, prompts, long)
    full = {tuple(p): p + o for p, o in zip(prompts, outs, strict=True)}
    llm = _llm(target, head, policy="adaptive", num_draft_tokens=4, max_depth=4)
    llm.engine.runner._draft = _OracleDraft(llm.engine.runner, full, seed=10)
    controller = llm.engine.spec_controller
    controller.tracker = AcceptanceTracker(prior_rate=0.95)
    assert _generate(llm, prompts, long) == outs
    assert controller.policy.name == "adaptive" and controller.num_speculating_steps > 0
    assert llm.engine.spec_stats().num_accepted_tokens > 0
    assert len(controller.tracker) == 0  # every finished request forgotten


def _drive_adaptive(
    *,
    acceptance: float,
    target_fixed_s: float,
    target_per_token_s: float,
    draft_setup_s: float,
    draft_per_depth_s: float,
    batch: int = 1,
    steps: int = 600,
    seed: int = 0,
) -> tuple[list[int], float]:
    """The adaptive controller as the engine configures it (default prior, default tracker),
    driven the way the runner drives it, by a synthetic engine: each draft is accepted with
    probability ``acceptance`` given the ones before it were; a target step over T query tokens
    takes target_fixed_s + target_per_token_s x T, drafting d deep draft_setup_s +
    draft_per_depth_s x d, each times a seeded +-5% jitter. Requests finish and new ones join
    every 60 steps. Returns the drafting depth of each step and the speedup over plain
    decoding after the first 50 steps (emitted tokens per synthetic second)."""
    config = SpeculativeConfig(
        draft_model="default", policy="adaptive", num_draft_tokens=8, max_depth=6
    )
    controller = SpeculationController.from_config(config)
    rng = random.Random(seed)
    requests = [f"0-{i}" for i in range(batch)]
    depths, tokens, seconds = [], 0.0, 0.0
    for step in range(steps):
        if step and step % 60 == 0:
            for rid in requests:
                controller.forget(rid)
            requests = [f"{step}-{i}" for i in range(batch)]
        budgets = controller.budget_for(requests)
        trees = {
            rid: tree_shape(k, config.max_depth, config.tree_top_k)[0]
            for rid, k in budgets.items()
            if k
        }
        emitted = batch
        for rid, depth in trees.items():
            accepted = 0
            while accepted < depth and rng.random() < acceptance:
                accepted += 1
            controller.observe_verify(rid, depth, accepted)
            emitted += accepted
        num_tokens = batch + sum(budgets.values())
        target_s = target_fixed_s + target_per_token_s * num_tokens
        controller.observe_target_step(
            num_tokens, target_s * rng.uniform(0.95, 1.05), drafting=bool(trees)
        )
        draft_s = 0.0
        if trees:
            depth = max(trees.values())
            draft_s = draft_setup_s + draft_per_depth_s * depth
            controller.observe_drafting(depth, len(trees), draft_s * rng.uniform(0.95, 1.05))
        depths.append(max(trees.values(), default=0))
        if step >= 50:
            tokens += emitted
            seconds += target_s + draft_s
    plain = batch / (target_fixed_s + target_per_token_s * batch)
    return depths, tokens / seconds / plain


def _best_chain_speedup(
    *, acceptance, target_fixed_s, target_per_token_s, draft_setup_s, draft_per_depth_s, batch=1
) -> float:
    """The best speedup any fixed chain depth (1..6) gives by the synthetic engine's own costs:
    a chain of k emits 1 + a + ... + a^k tokens per request and step."""
    plain = batch / (target_fixed_s + target_per_token_s * batch)
    return max(
        batch
        * sum(acceptance**j for j in range(k + 1))
        / (
            target_fixed_s
            + target_per_token_s * batch * (1 + k)
            + draft_setup_s
            + draft_per_depth_s * k
        )
        / plain
        for k in range(1, 7)
    )


# A memory-bound target step (10 ms, +0.05 ms per token) and a head costing a tenth of it.
CHEAP_DRAFTS = {
    "target_fixed_s": 0.010,
    "target_per_token_s": 5e-5,
    "draft_setup_s": 5e-4,
    "draft_per_depth_s": 5e-4,
}
DRAFTING_PAYS = {
    "good acceptance": {"acceptance": 0.8, **CHEAP_DRAFTS},
    "batch of 4": {
        "acceptance": 0.75,
        **CHEAP_DRAFTS,
        "target_per_token_s": 1e-4,
        "draft_per_depth_s": 8e-4,
        "batch": 4,
    },
}
DRAFTING_DOES_NOT_PAY = {
    "poor acceptance": {"acceptance": 0.05, **CHEAP_DRAFTS},
    "expensive drafts": {
        "acceptance": 0.8,
        **CHEAP_DRAFTS,
        "draft_setup_s": 0.004,
        "draft_per_depth_s": 0.008,
    },
    "compute-bound batch of 32": {
        "acceptance": 0.7,
        **CHEAP_DRAFTS,
        "target_fixed_s": 0.002,
        "target_per_token_s": 1e-3,
        "batch": 32,
    },
    "head half the target": {
        "acceptance": 0.7,
        "target_fixed_s": 0.004,
        "target_per_token_s": 1e-4,
        "draft_setup_s": 0.001,
        "draft_per_depth_s": 0.002,
    },
}


@pytest.mark.parametrize("case", DRAFTING_PAYS)
def test_adaptive_policy_drafts_where_drafting_pays(case) -> None:
    """From the default prior, it keeps drafting, deep, where the costs and acceptance it
    measures make drafting pay: 99.6% of steps after the first 50, within 2% of the best fixed
    chain (2.81x of 2.87x; 2.01x of 2.02x at batch 4)."""
    scenario = DRAFTING_PAYS[case]
    best = _best_chain_speedup(**scenario)
    assert best > 1.5  # the premise, by the synthetic engine's own costs
    depths, speedup = _drive_adaptive(**scenario)
    after_warm_up = depths[50:]
    assert sum(d > 0 for d in after_warm_up) > 0.9 * len(after_warm_up)
    assert sum(after_warm_up) / len(after_warm_up) >= 3.0  # deep drafts (3.8-5.9 seen)
    assert speedup > 0.9 * best, (speedup, best)


@pytest.mark.parametrize("case", DRAFTING_DOES_NOT_PAY)
def test_adaptive_policy_stops_drafting_where_it_does_not_pay(case) -> None:
    """From the same default prior (which predicts drafting pays, so the first steps draft),
    it stops once it has measured poor acceptance, a head as costly as the target, or a
    compute-bound batch: drafting in 0.4-0.5% of steps after the first 50 (its probes), at
    plain decoding's speed (99.8-100%)."""
    scenario = DRAFTING_DOES_NOT_PAY[case]
    assert _best_chain_speedup(**scenario) < 1.0  # the premise
    depths, speedup = _drive_adaptive(**scenario)
    assert any(depths[:10])  # the default prior drafts at first: it has learned to stop
    after_warm_up = depths[50:]
    assert sum(d > 0 for d in after_warm_up) < 0.02 * len(after_warm_up)
    assert speedup > 0.98, speedup


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

    def record(budgets, context):
        trees = draft(budgets, context)
        drafted.extend(t for tree in trees.values() for t in tree.token_ids)
        return trees

    runner._draft = record
    assert _generate(llm, prompts, params) == plain
    assert drafted and set(drafted) <= set(vocab)
    with pytest.raises(ValueError, match="tree_top_k: 4 exceeds the head's draft vocabulary"):
        head.set_draft_vocab([1, 2, 3])
        save_eagle_head(head, tmp_path / "small")
        _llm(target, tmp_path / "small", tree_top_k=4)
