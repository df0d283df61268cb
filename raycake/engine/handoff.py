"""What crosses the prefill-to-decode hand-off inside the engine: the exported KV (and EAGLE
features) of a prompt, and the checks a decode engine runs on them before admitting anything."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycake.model.config import ModelConfig


@dataclass(frozen=True)
class ExportedKV:
    """A prompt's KV as it leaves a prefill engine."""

    kv: torch.Tensor  # [layers, 2, blocks, P, K, Dh]; the last block may be partly filled
    block_hashes: list[bytes]  # chained hashes of the full blocks (a prefix of ``kv``'s blocks)
    num_tokens: int  # prompt tokens whose KV is in ``kv``
    # [num_tokens, hidden]: the target's features at each prompt position, which the EAGLE
    # head drafts from; None without speculation. ``add_prefilled_request(features=...)``.
    features: torch.Tensor | None = None


def check_prefilled_kv(
    model_config: ModelConfig,
    block_size: int,
    num_prompt_tokens: int,
    kv: object,
    features: object | None,
) -> None:
    """A prefilled prompt's KV ([layers, 2, blocks, P, K, Dh]) and EAGLE features ([tokens,
    hidden]) as this engine's model lays them out; ``ValueError`` naming the field otherwise."""
    expected = (
        model_config.num_hidden_layers,
        2,
        -(-num_prompt_tokens // block_size),
        block_size,
        model_config.num_key_value_heads,
        model_config.head_dim,
    )
    if not isinstance(kv, torch.Tensor) or not kv.is_floating_point():
        raise ValueError(f"kv: expected a floating-point tensor, got {_describe(kv)}")
    if tuple(kv.shape) != expected:
        raise ValueError(f"kv: expected shape {expected}, got {tuple(kv.shape)}")
    if features is not None:
        expected_features = (num_prompt_tokens, model_config.hidden_size)
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise ValueError(
                f"features: expected a floating-point tensor, got {_describe(features)}"
            )
        if tuple(features.shape) != expected_features:
            raise ValueError(
                f"features: expected shape {expected_features} (prompt tokens, hidden "
                f"size), got {tuple(features.shape)}"
            )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
