"""The EAGLE-1 draft head: one decoder layer that predicts the target's next final hidden state.

Legend: T tokens in the step (or B x S when training without a cache), E the target's hidden
size, D the draft layer's width, V vocabulary.

The head owns only ``fc`` (2E -> D, with bias), one dense decoder layer without its first input
norm, and, when the layer is narrower than the target (D < E), ``proj`` (D -> E, no bias) back to
the target's feature space. At D = E (EAGLE-1) the layer has the target's shape and there is no
``proj``. The token embedding and the lm_head are the target's, shared and frozen: the head
reads ``embed_tokens`` from the caller and the caller projects its output with
``target.compute_logits``.

Narrow layer: drafting at batch 1 reads the head's weights once per draft depth, so its cost
follows their size. On a small target the EAGLE-1 head is a large share of the target (on the
embedded model, 28% with its draft vocabulary); ``DraftLayerShape`` sizes the layer for the
target instead (``DraftLayerShape.narrow``). Since ``proj`` is linear and has no bias, drafting
can fold it into the next layer's ``fc`` and into the lm_head rows
(``raycake.engine.spec.drafter``).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from raycake.model.attention import AttentionMetadata
from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.llama import LlamaDecoderLayer
from raycake.model.rope import RotaryEmbedding
from raycake.validation import check_positive_int, require

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


@dataclass(frozen=True)
class DraftLayerShape:
    """The draft layer's own shape, when it is not the target's (a narrow head)."""

    hidden_size: int  # D
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            check_positive_int(f"draft_layer.{name}", getattr(self, name))
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "draft_layer.num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
            self.num_key_value_heads,
        )
        require(
            self.head_dim % 2 == 0,
            "draft_layer.head_dim",
            "an even number (RoPE rotates pairs)",
            self.head_dim,
        )

    @classmethod
    def narrow(cls, target: ModelConfig, hidden_size: int) -> DraftLayerShape:
        """A layer of width ``hidden_size`` in the target's proportions: its head_dim, as many
        heads as fit, the target's query heads per kv head where they divide, and its MLP ratio."""
        check_positive_int("draft_layer.hidden_size", hidden_size)
        require(
            hidden_size % target.head_dim == 0,
            "draft_layer.hidden_size",
            f"a multiple of the target's head_dim ({target.head_dim})",
            hidden_size,
        )
        heads = hidden_size // target.head_dim
        group = target.num_attention_heads // target.num_key_value_heads
        kv_heads = heads // group if heads % group == 0 else heads
        intermediate = round(hidden_size * target.intermediate_size / target.hidden_size)
        return cls(hidden_size, intermediate, heads, kv_heads, target.head_dim)

    def layer_config(self, target: ModelConfig) -> ModelConfig:
        """The target's dense config at this shape (norm eps, RoPE and biases stay the target's)."""
        return dataclasses.replace(_dense(target), **dataclasses.asdict(self))


class EagleDraftHead(nn.Module):
    def __init__(
        self, target_config: ModelConfig, draft_layer: DraftLayerShape | None = None
    ) -> None:
        super().__init__()
        self.config = _dense(target_config)  # the target's shape (features, vocabulary)
        self.draft_layer = draft_layer  # None: the target's shape (EAGLE-1)
        self.layer_config = (
            self.config if draft_layer is None else draft_layer.layer_config(self.config)
        )
        hidden, width = self.config.hidden_size, self.layer_config.hidden_size
        self.fc = nn.Linear(2 * hidden, width, bias=True)
        self.layer = LlamaDecoderLayer(self.layer_config, MoEConfig(), 0)
        # EAGLE-1 drops the first input norm: fc's output goes straight into attention.
        self.layer.input_layernorm = nn.Identity()
        # Back to the target's feature space (none at full width). NOTE: linear without a bias,
        # so that drafting can fold it into fc and the lm_head.
        self.proj = None if width == hidden else nn.Linear(width, hidden, bias=False)
        self.rotary_emb = RotaryEmbedding(self.layer_config)
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
        x = self.fc(torch.cat((embeds, features), dim=-1))  # [..., 2E] -> [..., D]
        cos, sin = self.rotary_emb(positions, x.dtype)
        h = self.layer(x, cos, sin, meta, kv_cache)  # [..., D]
        return h if self.proj is None else self.proj(h)  # [..., E]


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
        # The draft layer's shape; null: the target's (EAGLE-1).
        "draft_layer": None if head.draft_layer is None else dataclasses.asdict(head.draft_layer),
        "draft_vocab_size": None if head.draft_vocab is None else len(head.draft_vocab),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_draft_layer(head_dir: str | Path) -> DraftLayerShape | None:
    """The draft layer's shape of a saved head (None: the target's; heads saved before narrow
    layers existed have none)."""
    path = Path(head_dir) / "config.json"
    layer = json.loads(path.read_text()).get("draft_layer")
    if layer is None:
        return None
    if not isinstance(layer, dict):
        raise ValueError(f"{path}: draft_layer: expected a mapping or null, got {layer!r}")
    names = {f.name for f in dataclasses.fields(DraftLayerShape)}
    if set(layer) != names:
        raise ValueError(
            f"{path}: draft_layer: expected the keys {sorted(names)}, got {sorted(layer)}"
        )
    try:
        return DraftLayerShape(**layer)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


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
    head = EagleDraftHead(head_config, read_draft_layer(head_dir))
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
