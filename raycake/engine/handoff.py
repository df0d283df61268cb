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
    # Titans: the memory state after the prompt, by tensor name (``MemoryStatePool.read``);
    # None for other models.
    memory_state: dict[str, torch.Tensor] | None = None


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


def check_memory_state(
    expected: dict[str, tuple[int, ...]], memory_state: dict[str, object]
) -> None:
    """A Titans memory state with exactly the tensors (names, shapes) this engine's model has,
    all finite: a NaN in a state would poison every later token of the sequence."""
    if not isinstance(memory_state, dict):
        raise ValueError(f"memory_state: expected a dict of tensors, got {_describe(memory_state)}")
    if set(memory_state) != set(expected):
        missing = sorted(set(expected) - set(memory_state))
        extra = sorted(set(memory_state) - set(expected))
        raise ValueError(f"memory_state: missing tensors {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        tensor = memory_state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"memory_state[{name!r}]: expected a floating-point tensor")
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"memory_state[{name!r}]: expected shape {shape}, got {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"memory_state[{name!r}]: contains NaN or infinity")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
