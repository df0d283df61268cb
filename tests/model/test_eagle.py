"""The EAGLE draft head: paged forward equals the dense (training) forward; save/load round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from raycake.model.attention import AttentionMetadata, QuerySpan
from raycake.model.config import ModelConfig
from raycake.model.eagle import EAGLE_ARCHITECTURE, EagleDraftHead, load_eagle_head, save_eagle_head

CONFIG = ModelConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rope_theta=10000.0,
)


def _inputs(seq: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Embedding]:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(CONFIG.vocab_size, CONFIG.hidden_size)
    features = torch.randn(1, seq, CONFIG.hidden_size)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, seq))
    positions = torch.arange(1, seq + 1)[None]
    return features, tokens, positions, embed


def test_head_shape_and_first_norm_dropped() -> None:
    head = EagleDraftHead(CONFIG)
    assert head.fc.in_features == 2 * CONFIG.hidden_size and head.fc.bias is not None
    assert isinstance(head.layer.input_layernorm, torch.nn.Identity)
    names = set(head.state_dict())
    assert all(n.startswith(("fc.", "layer.")) for n in names)
    features, tokens, positions, embed = _inputs()
    assert head(features, tokens, positions, embed).shape == features.shape


@torch.inference_mode()
def test_paged_forward_matches_dense() -> None:
    torch.manual_seed(1)
    head = EagleDraftHead(CONFIG).eval()
    features, tokens, positions, embed = _inputs(seq=7)
    dense = head(features, tokens, positions, embed)[0]  # [S, E]
    # Paged: slot p holds position p; position 0 is never written, so masked out.
    block_size, num_blocks = 4, 3
    kv = torch.zeros(2, block_size * num_blocks, CONFIG.num_key_value_heads, CONFIG.head_dim)
    pos = positions[0]
    context = int(pos[-1]) + 1
    blocked = (torch.arange(context)[None] > pos[:, None]) | (torch.arange(context)[None] == 0)
    mask = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))
    # Two steps: the first 4 entries, then the rest against the cached ones.
    outs = []
    for lo, hi in ((0, 4), (4, 7)):
        span_pos = pos[lo:hi]
        ctx = int(span_pos[-1]) + 1
        meta = AttentionMetadata(
            block_size=block_size,
            slot_mapping=span_pos.clone(),
            num_decode_tokens=0,
            decode_groups=[],
            spans=[
                QuerySpan(0, hi - lo, torch.arange(-(-ctx // block_size)), ctx, mask[lo:hi, :ctx])
            ],
        )
        outs.append(head(features[0, lo:hi], tokens[0, lo:hi], span_pos, embed, meta, kv))
    torch.testing.assert_close(torch.cat(outs), dense, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path) -> None:
    head = EagleDraftHead(CONFIG)
    save_eagle_head(head, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [EAGLE_ARCHITECTURE]
    assert config["target"]["hidden_size"] == CONFIG.hidden_size
    loaded = load_eagle_head(tmp_path, CONFIG)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert load_eagle_head(tmp_path, dtype="bfloat16").fc.weight.dtype == torch.bfloat16


def test_draft_vocabulary_round_trip_and_validation(tmp_path) -> None:
    head = EagleDraftHead(CONFIG)
    head.set_draft_vocab([7, 3, 11])
    save_eagle_head(head, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 3
    loaded = load_eagle_head(tmp_path, CONFIG, dtype="bfloat16")
    # Token ids stay int64 whatever the weights' dtype.
    assert loaded.draft_vocab.dtype == torch.long and loaded.draft_vocab.tolist() == [7, 3, 11]
    assert "draft_vocab" not in loaded.state_dict()
    for bad, message in (
        ([], "non-empty"),
        ([[1, 2]], "1-D"),
        ([1.0, 2.0], "token ids"),
        ([1, 50], r"\[0, 50\)"),
        ([4, 4], "distinct"),
    ):
        with pytest.raises(ValueError, match=message):
            head.set_draft_vocab(bad)


def test_load_rejects_a_head_for_another_target(tmp_path) -> None:
    save_eagle_head(EagleDraftHead(CONFIG), tmp_path)

    other = dataclasses.replace(CONFIG, vocab_size=60)
    with pytest.raises(ValueError, match="vocab_size=50"):
        load_eagle_head(tmp_path, other)
