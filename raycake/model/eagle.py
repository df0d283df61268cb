"""The EAGLE-1 draft head: one decoder layer that predicts the target's next final hidden state.

Legend: T tokens in the step (or B x S when training without a cache), E hidden size, V vocabulary.

The head owns only ``fc`` (2E -> E, with bias) and one dense decoder layer of the target's shape
without its first input norm. The token embedding and the lm_head are the target's, shared and
frozen: the head reads ``embed_tokens`` from the caller and the caller projects its output with
``target.compute_logits``.

Draft vocabulary (optional, as in EAGLE-3 and FR-Spec): the head may carry ``draft_vocab``, the
ids of the most frequent tokens of its training corpus; drafts are then drawn from those only,
through the matching rows of the lm_head. On a model whose lm_head is a large share of its
weights that makes each draft step several times cheaper, and verification keeps the output
exact whatever the drafts are.

Pairing: the head's entry at position ``t + 1`` consumes the target's feature at position ``t``
(its final hidden state, after the final norm) and the token at ``t + 1``; it returns the predicted
feature at ``t + 1``, whose logits draft the token at ``t + 2``. Position 0 has no entry.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raycake.model.attention import AttentionMetadata
from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.llama import LlamaDecoderLayer
from raycake.model.rope import RotaryEmbedding

EAGLE_ARCHITECTURE = "EagleDraftHead"
_WEIGHTS = "model.safetensors"
_DRAFT_VOCAB = "draft_vocab"  # the optional int64 tensor of draft token ids
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields of the target that the head's weights and the shared embedding/lm_head depend on.
_SHAPE_FIELDS = (
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


def _dense(config: ModelConfig) -> ModelConfig:
    """The target's shape as a dense Llama (an MoE target still gets a dense draft layer)."""
    return dataclasses.replace(config, num_experts=0, architecture="LlamaForCausalLM")


class EagleDraftHead(nn.Module):
    def __init__(self, target_config: ModelConfig) -> None:
        super().__init__()
        self.config = _dense(target_config)
        hidden = self.config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaDecoderLayer(self.config, MoEConfig(), 0)
        # EAGLE-1 drops the first input norm: fc's output goes straight into attention.
        self.layer.input_layernorm = nn.Identity()
        self.rotary_emb = RotaryEmbedding(self.config)
        self.draft_vocab: torch.Tensor | None = None  # [Vd] token ids, or None: all of them

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Restrict drafts to ``token_ids`` (distinct ids in [0, vocab_size)); None: no limit."""
        if token_ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(token_ids)
        vocab = self.config.vocab_size
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(
                f"draft_vocab: expected a non-empty 1-D list of token ids, got shape "
                f"{tuple(ids.shape)} of {ids.dtype}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"draft_vocab: token ids must be in [0, {vocab})")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("draft_vocab: token ids must be distinct")
        self.draft_vocab = ids.to(torch.long).cpu()

    def forward(
        self,
        features: torch.Tensor,
        next_token_ids: torch.Tensor,
        positions: torch.Tensor,
        embed_tokens: nn.Embedding,
        meta: AttentionMetadata | None = None,
        kv_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features [..., E] at positions t; next_token_ids, positions [...] of t + 1.

        ``[B, S]`` inputs without ``meta``: dense causal (training). ``[T]`` inputs with
        ``meta`` and ``kv_cache`` ([2, slots, K, Dh]): paged, like ``LlamaDecoderLayer``.
        Returns the predicted features at t + 1 [..., E].
        """
        embeds = embed_tokens(next_token_ids).to(features.dtype)  # [..., E]
        x = self.fc(torch.cat((embeds, features), dim=-1))  # [..., 2E] -> [..., E]
        cos, sin = self.rotary_emb(positions, x.dtype)
        return self.layer(x, cos, sin, meta, kv_cache)  # [..., E]


def save_eagle_head(head: EagleDraftHead, out_dir: str | Path, dtype: str = "float32") -> None:
    """Write ``model.safetensors`` (the head's own parameters: fc.*, layer.*, and its
    ``draft_vocab`` when it has one) and config.json."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to("cpu", _DTYPES[dtype]).contiguous()
        for name, t in head.state_dict().items()
    }
    if head.draft_vocab is not None:
        tensors[_DRAFT_VOCAB] = head.draft_vocab.contiguous()
    save_file(tensors, str(out / _WEIGHTS))
    config = {
        "architectures": [EAGLE_ARCHITECTURE],
        "target": head.config.to_hf_config(dtype),
        "draft_vocab_size": None if head.draft_vocab is None else len(head.draft_vocab),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_eagle_config(head_dir: str | Path) -> ModelConfig:
    """The target shape a saved head was built for."""
    path = Path(head_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: config.json not found in the EAGLE head folder")
    data = json.loads(path.read_text())
    if data.get("architectures") != [EAGLE_ARCHITECTURE]:
        raise ValueError(
            f"{path}: architectures: expected [{EAGLE_ARCHITECTURE!r}], "
            f"got {data.get('architectures')!r}"
        )
    if not isinstance(data.get("target"), dict):
        raise ValueError(f"{path}: expected a 'target' mapping (the target's HF config)")
    return ModelConfig.from_hf_config(data["target"])


def load_eagle_head(
    head_dir: str | Path,
    target_config: ModelConfig | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> EagleDraftHead:
    """Load a head saved by ``save_eagle_head``; with ``target_config``, check it fits that target."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    head_config = read_eagle_config(head_dir)
    if target_config is not None:
        for name in _SHAPE_FIELDS:
            ours, theirs = getattr(head_config, name), getattr(target_config, name)
            if ours != theirs:
                raise ValueError(
                    f"{head_dir}: EAGLE head was built for a target with {name}={ours}, "
                    f"but the target has {name}={theirs}"
                )
        head_config = dataclasses.replace(
            head_config,
            rope_theta=target_config.rope_theta,
            rope_scaling=target_config.rope_scaling,
            rms_norm_eps=target_config.rms_norm_eps,
        )
    head = EagleDraftHead(head_config)
    path = Path(head_dir) / _WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    draft_vocab = tensors.pop(_DRAFT_VOCAB, None)
    if draft_vocab is not None:
        try:
            head.set_draft_vocab(draft_vocab)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
            )
    head.load_state_dict(tensors)
    return head.to(device=device, dtype=_DTYPES[dtype]).eval()
