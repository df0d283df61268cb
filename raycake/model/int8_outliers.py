"""Where LLM.int8() really runs in int8: outlier columns per layer, on the model's own activations.

Legend: T tokens of one call, K input features.

LLM.int8() splits every matmul by input column: a column with any |x| >= threshold in the call
runs in floating point for every row of the call, the rest in int8. So the share of
multiply-adds done in int8 is 1 - (outlier columns / K), and it depends on the call: a prefill of
many tokens unions the outlier columns of all of them; a decode step has one token per sequence.
``measure_outliers`` hooks every ``Int8Linear`` of a quantized model, runs windows of real text
through it and reports per layer:
- the int8 share of multiply-adds for calls of one window (prefill-like) and of one token
  (decode-like);
- how systematic the outliers are (the paper: at scale they sit in a few fixed feature
  dimensions): the columns that are outliers in at least ``SYSTEMATIC_SHARE`` of the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raycake.model.int8_linear import Int8Linear

# A column counts as a systematic outlier when at least this share of the tokens has it.
SYSTEMATIC_SHARE = 0.25


@dataclass(frozen=True)
class LayerOutliers:
    """One Int8Linear over the measured windows."""

    name: str  # module path, e.g. "model.layers.0.mlp.down_proj"
    in_features: int
    out_features: int
    threshold: float
    # Int8 share of multiply-adds, mean over calls: one window per call / one token per call.
    int8_share_window: float
    int8_share_token: float
    # Columns with an outlier in any token of any window.
    outlier_columns_any: int
    # Columns with an outlier in >= SYSTEMATIC_SHARE of the tokens.
    systematic_columns: int


class _Tally:
    """Running counts of one layer's calls."""

    def __init__(self, in_features: int, threshold: float) -> None:
        self.threshold = threshold
        self.windows = self.tokens = 0
        self.window_share_sum = self.token_share_sum = 0.0
        self.column_hits = torch.zeros(in_features, dtype=torch.long)  # tokens per column

    def add(self, x: torch.Tensor) -> None:
        """One call's input x [T, K]."""
        hits = (x.detach().float().abs() >= self.threshold).cpu()  # [T, K]
        k = hits.shape[1]
        self.windows += 1
        self.window_share_sum += 1.0 - hits.any(0).sum().item() / k
        self.tokens += hits.shape[0]
        self.token_share_sum += (1.0 - hits.sum(1).float() / k).sum().item()
        self.column_hits += hits.sum(0)


def measure_outliers(
    model: nn.Module, run: Callable[[torch.Tensor], object], windows: torch.Tensor
) -> list[LayerOutliers]:
    """Run ``run(window)`` (a forward over token ids [1, T]) for each row of ``windows`` [W, T]
    and report every ``Int8Linear`` of ``model`` in module order. Each window is one call of
    each layer, as in a prefill of T tokens."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    if not layers:
        raise ValueError("model: no Int8Linear layers (load it with quantization='int8')")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise ValueError(f"windows: expected token ids [W, T] with W, T >= 1, got {windows.shape}")
    tallies = {name: _Tally(m.in_features, m.threshold) for name, m in layers.items()}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, tally=tallies[name]: tally.add(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            for window in windows:
                run(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return [
        LayerOutliers(
            name=name,
            in_features=layers[name].in_features,
            out_features=layers[name].out_features,
            threshold=layers[name].threshold,
            int8_share_window=t.window_share_sum / t.windows,
            int8_share_token=t.token_share_sum / t.tokens,
            outlier_columns_any=int((t.column_hits > 0).sum()),
            systematic_columns=int((t.column_hits >= SYSTEMATIC_SHARE * t.tokens).sum()),
        )
        for name, t in tallies.items()
    ]


def int8_share_overall(layers: list[LayerOutliers], per: str = "window") -> float:
    """The model's int8 share of multiply-adds over all its Int8Linear layers, each weighted by
    its multiply-adds per token (in_features x out_features)."""
    fields = {"window": "int8_share_window", "token": "int8_share_token"}
    if per not in fields:
        raise ValueError(f"per: expected 'window' or 'token', got {per!r}")
    if not layers:
        raise ValueError("layers: empty")
    weights = [layer.in_features * layer.out_features for layer in layers]
    shares = [getattr(layer, fields[per]) for layer in layers]
    return sum(w * s for w, s in zip(weights, shares, strict=True)) / sum(weights)
