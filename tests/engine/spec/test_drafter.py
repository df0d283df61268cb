"""The narrow EAGLE head and the drafter: a narrow head's config round-trips; the drafter's
folded weights, paged catch-up and dense tree attention give the head's own (dense, unfolded)
forward; greedy output with a narrow head and budgets that differ per request equals plain
decoding."""

from __future__ import annotations

import json
import random

import pytest
import torch

from raycake import LLM, SamplingParams
from raycake.engine.spec.config import SpeculativeConfig
from raycake.engine.spec.drafter import CatchUpBatch, EagleDrafter
from raycake.model.eagle import (
    DraftLayerShape,
    EagleDraftHead,
    load_eagle_head,
    read_draft_layer,
    save_eagle_head,
)
from raycake.model.llama import LlamaForCausalLM
from raycake.model.loader import read_model_config
from tests.llama_checkpoints import CONFIGS, build_checkpoint


@pytest.fixture(scope="module", params=CONFIGS[:2], ids=lambda s: s.name)
def target_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.name)
    build_checkpoint(request.param, out / "target")
    return out / "target"


def test_narrow_shape_follows_the_target(target_dir) -> None:
    config = read_model_config(target_dir)  # hidden 64, 4 heads of 16
    shape = DraftLayerShape.narrow(config, 32)
    group = config.num_attention_heads // config.num_key_value_heads
    assert (shape.hidden_size, shape.num_attention_heads, shape.head_dim) == (32, 2, 16)
    assert shape.num_key_value_heads == (2 // group if 2 % group == 0 else 2)
    assert shape.intermediate_size == round(32 * config.intermediate_size / 64)
    with pytest.raises(ValueError, match=r"draft_layer\.hidden_size"):
        DraftLayerShape.narrow(config, 24)  # not a multiple of head_dim
    with pytest.raises(ValueError, match=r"draft_layer\.num_key_value_heads"):
        DraftLayerShape(32, 48, 2, 3, 16)


def test_narrow_head_config_round_trips(target_dir, tmp_path) -> None:
    config = read_model_config(target_dir)
    torch.manual_seed(0)
    head = EagleDraftHead(config, DraftLayerShape.narrow(config, 32))
    head.set_draft_vocab(list(range(0, 320, 2)))
    save_eagle_head(head, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["draft_layer"]["hidden_size"] == 32
    assert read_draft_layer(tmp_path) == head.draft_layer
    loaded = load_eagle_head(tmp_path, config)
    assert loaded.draft_layer == head.draft_layer
    assert loaded.proj is not None and tuple(loaded.proj.weight.shape) == (64, 32)
    assert tuple(loaded.fc.weight.shape) == (32, 128)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.draft_vocab, head.draft_vocab)
    # A full-width head has no proj and saves no layer shape (EAGLE-1, as before).
    save_eagle_head(EagleDraftHead(config), tmp_path / "full")
    assert read_draft_layer(tmp_path / "full") is None
    assert load_eagle_head(tmp_path / "full", config).proj is None
    # A malformed layer shape names the field.
    saved["draft_layer"]["num_key_value_heads"] = 0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"draft_layer\.num_key_value_heads"):
        load_eagle_head(tmp_path, config)


@pytest.mark.parametrize("width", [None, 32], ids=["full", "narrow"])
@pytest.mark.parametrize("draft_vocab", [False, True], ids=["all", "vocab"])
def test_folded_drafting_matches_the_head(target_dir, width, draft_vocab) -> None:
    """Catch-up over a sequence (paged, in blocks of 4, entries written in two steps) and a
    chain of expansions give the h whose projection is the head's own dense forward on the same
    inputs, and whose draft logits are the lm_head's over the draft vocabulary."""
    config = read_model_config(target_dir)
    torch.manual_seed(1)
    target = LlamaForCausalLM(config).eval()
    head = EagleDraftHead(config, None if width is None else DraftLayerShape.narrow(config, width))
    for param in head.parameters():  # non-trivial norms and biases too
        torch.nn.init.normal_(param, std=0.2)
    vocab = list(range(1, 320, 3)) if draft_vocab else None
    head.set_draft_vocab(vocab)
    head.eval()
    block_size, n = 4, 11
    drafter = EagleDrafter(head, target, num_slots=16 * block_size, block_size=block_size)
    tokens = torch.randint(0, 320, (n + 3,))
    table = [5, 2, 9, 0]  # positions 0..15 live in these blocks, in this order

    def slot(p: int) -> int:
        return table[p // block_size] * block_size + p % block_size

    with torch.inference_mode():
        features = target(tokens[None, :n], torch.arange(n)[None])[0]  # [n, E]

        def project(h: torch.Tensor) -> torch.Tensor:
            return h if head.proj is None else head.proj(h)

        def catch_up(first: int, last: int):
            batch = CatchUpBatch(
                token_ids=tokens[first : last + 1].tolist(),
                positions=list(range(first, last + 1)),
                slots=[slot(p) for p in range(first, last + 1)],
                block_tables=[table[: -(-(last + 1) // block_size)]],
                context_lens=[last + 1],
                row_starts=[0, last + 1 - first],
            )
            return drafter.catch_up(batch, features[first - 1 : last], draft_columns=2)

        catch_up(1, 6)
        hidden, context = catch_up(7, n - 1)  # entries 7..n-1 attend 1..6 from the cache
        positions = torch.arange(1, n)[None]
        expected = head(
            features[None, :-1], tokens[None, 1:n], positions, target.model.embed_tokens
        )
        torch.testing.assert_close(project(hidden), expected[0, 6:], rtol=1e-4, atol=1e-4)
        rows = target.lm_head.weight if vocab is None else target.lm_head.weight[vocab]
        logp = (expected[0, -1:] @ rows.T).log_softmax(-1)
        vals, ids = drafter.top_k(hidden[-1:], 3)
        best = logp.topk(3)
        assert ids[0] == [vocab[i] if vocab else i for i in best.indices[0].tolist()]
        torch.testing.assert_close(torch.tensor(vals[0]), best.values[0], rtol=1e-4, atol=1e-4)

        # A chain: drafted tokens at n, n + 1, each fed the predicted feature of its parent.
        chain_h, feats = hidden[-1:], [*features[:-1], project(hidden[-1])]
        for depth in (1, 2):
            chain_h = drafter.expand(
                context, chain_h, [int(tokens[n - 1 + depth])], [n - 1 + depth], 1, depth - 1, None
            )
            expected = head(
                torch.stack(feats)[None],
                tokens[None, 1 : n + depth],
                torch.arange(1, n + depth)[None],
                target.model.embed_tokens,
            )
            torch.testing.assert_close(project(chain_h[0]), expected[0, -1], rtol=1e-4, atol=1e-4)
            feats.append(project(chain_h[0]))


def test_narrow_head_greedy_equals_plain_with_uneven_budgets(target_dir, tmp_path) -> None:
    """Budgets that differ per request every step: chains, trees of width 2 and 3 and no draft
    side by side (padded frontiers and catch-ups, requests that stop growing early)."""
    config = read_model_config(target_dir)
    torch.manual_seed(2)
    save_eagle_head(EagleDraftHead(config, DraftLayerShape.narrow(config, 32)), tmp_path)
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(2, 320) for _ in range(rng.randrange(1, 22))] for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True) for i in range(8)]
    plain = LLM(str(target_dir), block_size=4, max_num_seqs=8)
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    spec = SpeculativeConfig(draft_model=str(tmp_path), num_draft_tokens=9, max_depth=3)
    llm = LLM(str(target_dir), block_size=4, max_num_seqs=8, speculative=spec)
    scheduler, budget = llm.engine.scheduler, llm.engine.scheduler.draft_budget
    picks = random.Random(1)

    def uneven(request_ids):  # never above the policy's (which respects tokens left)
        wanted = budget(request_ids)
        return {rid: min(picks.choice([0, 1, 3, 5, 6, 9]), n) for rid, n in wanted.items()}

    scheduler.draft_budget = uneven
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    stats = llm.engine.spec_stats()
    assert stats.num_verify_steps > 0
    assert stats.num_emitted_tokens == stats.num_accepted_tokens + stats.num_verify_steps
    scheduler.check_invariants()
