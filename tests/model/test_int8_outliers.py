"""The int8 outlier report against hand-counted activations, and on the embedded model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raycake.model.int8_linear import Int8Linear
from raycake.model.int8_outliers import (
    LayerOutliers,
    int8_share_overall,
    measure_outliers,
)

K = 8


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Int8Linear.from_linear(nn.Linear(K, 4), threshold=6.0)


def _activations() -> dict[int, torch.Tensor]:
    """Window id -> its input [3, K]: window 0 has outliers in columns 1 (two tokens) and 5
    (one token, exactly at the threshold); window 1 has none."""
    first = torch.zeros(3, K)
    first[0, 1], first[1, 1], first[1, 5] = 7.0, -8.0, 6.0
    first[2, 2] = 5.9  # below the threshold
    return {0: first, 1: torch.ones(3, K)}


def test_shares_and_columns_are_the_hand_counted_ones():
    model, inputs = _OneLayer(), _activations()
    windows = torch.tensor([[0, 0, 0], [1, 1, 1]])
    (layer,) = measure_outliers(model, lambda w: model.proj(inputs[int(w[0, 0])]), windows)
    assert (layer.name, layer.in_features, layer.out_features) == ("proj", K, 4)
    # Per window: {1, 5} of 8 columns run in fp, then none.
    assert layer.int8_share_window == pytest.approx((6 / 8 + 1) / 2)
    # Per token: 1, 2, 0 outlier columns, then 0, 0, 0.
    assert layer.int8_share_token == pytest.approx((7 / 8 + 6 / 8 + 1 + 3) / 6)
    assert layer.outlier_columns_any == 2
    # Column 1 in 2 of 6 tokens (>= 25%), column 5 in 1 of 6 (not).
    assert layer.systematic_columns == 1


def test_overall_share_weights_layers_by_their_multiply_adds():
    def layer(k: int, n: int, share: float) -> LayerOutliers:
        return LayerOutliers("x", k, n, 6.0, share, share, 0, 0)

    layers = [layer(10, 10, 0.5), layer(10, 30, 1.0)]
    assert int8_share_overall(layers) == pytest.approx((100 * 0.5 + 300 * 1.0) / 400)
    with pytest.raises(ValueError, match="per: expected 'window' or 'token'"):
        int8_share_overall(layers, "step")


def test_a_model_without_int8_layers_is_refused():
    with pytest.raises(ValueError, match="no Int8Linear layers"):
        measure_outliers(nn.Linear(2, 2), lambda w: None, torch.zeros(1, 1, dtype=torch.long))
