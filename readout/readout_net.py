"""The readout network of the Readout Bottleneck (Schulz et al. 2020, Section 3.3, Figure 3).

Three 1x1 convolutions with ReLUs between them, channel widths as in the paper's code:
in -> in/2 -> 2·C -> C, where ``in`` is the number of channels of all readout taps stacked and C
the bottleneck's channels. It maps the stacked, normalised, upsampled readout features to α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from readout.bottleneck import FeatureStatistics


class ReadoutNet(nn.Module):
    """(B, in, h, w) readout features -> α (B, C, h, w).

    The last layer starts with zero weights and bias ``init_alpha``, so training starts from α = 5,
    λ = sigmoid(5) ≈ 0.993: almost all of the signal passes, as at the start of a per-sample fit.
    """

    def __init__(self, in_channels: int, out_channels: int, init_alpha: float = 5.0) -> None:
        super().__init__()
        hidden = max(1, in_channels // 2)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * out_channels, 1),
            nn.ReLU(),
            nn.Conv2d(2 * out_channels, out_channels, 1),
        )
        last = self.layers[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, init_alpha)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def stack_readout_features(
    features: list[torch.Tensor], statistics: list[FeatureStatistics], size: tuple[int, int]
) -> torch.Tensor:
    """Normalises each tapped map by its statistics, resizes it to ``size`` and stacks the channels.

    features: maps (B, C_t, h_t, w_t) or vectors (B, C_t) such as the logits; vectors are broadcast
    over space, maps are resized bilinearly (align_corners=False). Returns (B, Σ C_t, h, w).
    """
    stacked = []
    for x, stats in zip(features, statistics, strict=True):
        x = (x - stats.mean) / stats.std
        if x.dim() == 2:
            x = x[:, :, None, None].expand(-1, -1, *size)
        elif tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        stacked.append(x)
    return torch.cat(stacked, dim=1)
