"""The readout network of the Readout Bottleneck (Schulz et al. 2020, Section 3.3, Figure 3).

Three 1x1 convolutions with ReLUs between them, channel widths as in the paper's code:
in -> in/2 -> 2·C -> C, where ``in`` is the number of channels of all readout taps stacked and C
the bottleneck's channels; ``hidden`` replaces the first hidden width in/2 (the costliest) by a
narrower one. It maps the stacked, normalised, upsampled readout features to α.

The first convolution dominates the cost: for resnet50 it maps 4840 stacked channels at 56x56, about
37 GMAC per image, nine times the classifier. It is linear, and so are the bilinear resize and the
broadcast of the logits, which act on each channel alone: they commute. :meth:`ReadoutNet.forward`
therefore applies each tap's block of the first convolution to that tap at the smaller of its own and
the bottleneck's resolution, then resizes and sums: the same α up to rounding (a test checks it), with
the first layer about ten times cheaper for resnet50 (3.6 GMAC). The resized maps are channels_last
and summed in place: the CPU's bilinear kernel is many times faster on channels_last maps of
thousands of channels than on contiguous ones, on which the resize, not the convolutions, had been
most of the readout's time (``python -m readout.bench readout``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from readout.bottleneck import FeatureStatistics


class ReadoutNet(nn.Module):
    """The tapped maps -> α (B, C, h, w) (:meth:`forward`), or the same from the stacked features
    (B, in, h, w) (:meth:`stacked`).

    The last layer starts with zero weights and bias ``init_alpha``, so training starts from α = 5,
    λ = sigmoid(5) ≈ 0.993: almost all of the signal passes, as at the start of a per-sample fit.
    """

    def __init__(
        self, in_channels: int, out_channels: int, init_alpha: float = 5.0, hidden: int | None = None
    ) -> None:
        super().__init__()
        if hidden is not None and hidden < 1:
            raise ValueError(f"the readout's hidden width must be >= 1, got {hidden}")
        hidden = hidden or max(1, in_channels // 2)
        self.hidden = hidden
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

    def stacked(self, features: torch.Tensor) -> torch.Tensor:
        """α from the stacked features (B, in, h, w) of :func:`stack_readout_features`."""
        return self.layers(features)

    def forward(
        self, features: list[torch.Tensor], statistics: list[FeatureStatistics], size: tuple[int, int]
    ) -> torch.Tensor:
        """α (B, C, h, w) from the tapped maps themselves: ``self.stacked(stack_readout_features(
        features, statistics, size))`` computed with the first convolution moved before the resize
        (see the module docstring). features: maps (B, C_t, h_t, w_t) or vectors (B, C_t), in the order
        of the stacked channels. The forward, so that a DDP wrapper of the net sees it run."""
        first = self.layers[0]
        assert isinstance(first, nn.Conv2d) and first.bias is not None
        weight = first.weight[:, :, 0, 0]  # (hidden, in)
        vectors = first.bias[None, :]  # (1 or B, hidden): the bias and the vector taps
        total: torch.Tensor | None = None  # (B, hidden, h, w): the map taps, summed in place
        offset = 0
        for x, stats in zip(features, statistics, strict=True):
            x = (x - stats.mean) / stats.std
            block = weight[:, offset : offset + x.shape[1]]
            offset += x.shape[1]
            if x.dim() == 2:
                vectors = vectors + x @ block.T
                continue
            # channels_last: the CPU's bilinear kernel is much faster on it for maps of thousands of
            # channels (see the module docstring), and GPUs prefer it for convolutions
            x = x.contiguous(memory_format=torch.channels_last)
            if x.shape[-2] * x.shape[-1] > size[0] * size[1]:
                x = _resize(x, size)  # a larger map: resize first, then the cheaper convolution
            y = _resize(F.conv2d(x, block[:, :, None, None]), size)
            total = y if total is None else total.add_(y)
        if offset != weight.shape[1]:
            raise ValueError(f"the taps have {offset} channels, the readout net reads {weight.shape[1]}")
        hidden = vectors[:, :, None, None]
        hidden = hidden.expand(-1, -1, *size) if total is None else total.add_(hidden)
        for layer in self.layers[1:]:
            if isinstance(layer, nn.Conv2d):
                # the weight as a view: its gradient then comes back in the parameter's own (contiguous)
                # strides, not the channels_last ones of the input, which DDP's gradient buckets expect
                hidden = F.conv2d(hidden, layer.weight.flatten(1)[:, :, None, None], layer.bias)
            else:
                hidden = layer(hidden)
        return hidden


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
        else:
            x = _resize(x, size)
        stacked.append(x)
    return torch.cat(stacked, dim=1)
