"""The information bottleneck (Schulz et al., ICLR 2020): noise injection, its estimator, KL, smoothing.

Notation follows the paper. ``R`` is the feature map at the bottleneck (B, C, h, w); μ, σ are its
per-feature mean and std over data; λ ∈ [0, 1] is the share of the signal let through.

- eq. 2: Z = λ·R + (1 − λ)·ε, ε ~ N(μ, σ²)
- eq. 5: D_KL(P(Z|R) || N(μ, σ²)) with r = (R − μ)/σ is
  −½ (1 + log (1 − λ)² − (λ·r)² − (1 − λ)²) nats per element
- eq. 7: λ = blur(σ_s, sigmoid(α))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LN2 = math.log(2.0)


class FeatureStatistics(nn.Module):
    """Streaming per-feature mean, std and share of non-zero activations of a (C, h, w) feature map.

    Sums are kept in float64, so states from several processes or data chunks merge exactly by
    addition (:meth:`merge`, :meth:`all_reduce`). The buffers are persistent: the statistics are saved
    and loaded with the ``state_dict`` of whatever module holds them.

    μ, σ and the active units are derived once per change of the sums and kept: every optimisation
    step of a Per-Sample fit reads them, and deriving them anew would also stop a GPU stream three times
    a step (the emptiness check reads the count on the host). Change the sums only through these
    methods, ``load_state_dict`` or ``.to()``; all of them drop the derived values.
    """

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor
    nonzero: torch.Tensor

    def __init__(self, shape: tuple[int, ...], min_std: float = 0.01, active_threshold: float = 0.01) -> None:
        super().__init__()
        self.min_std = min_std
        self.active_threshold = active_threshold
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("nonzero", torch.zeros(shape, dtype=torch.float64))
        self._derived: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.total.shape)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """features: (B, *shape), any float dtype."""
        if tuple(features.shape[1:]) != self.shape:
            raise ValueError(
                f"features of shape {tuple(features.shape[1:])} do not match statistics {self.shape}"
            )
        x = features.detach().to(torch.float64)
        self._derived = None
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += x.square().sum(0)
        self.nonzero += (x != 0).sum(0)

    @torch.no_grad()
    def merge(self, other: FeatureStatistics) -> None:
        """Adds another estimator's samples to this one."""
        self._derived = None
        for name in ("count", "total", "total_sq", "nonzero"):
            getattr(self, name).add_(getattr(other, name))

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sums the state over all ranks of the default process group (no-op without one)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        self._derived = None
        for name in ("count", "total", "total_sq", "nonzero"):
            torch.distributed.all_reduce(getattr(self, name))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._derived = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureStatistics:
        self._derived = None  # the buffers move or change dtype
        return super()._apply(fn, recurse)

    def _derive(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ, active) from the sums, computed on the first use after they changed."""
        if self._derived is None:
            if self.count.item() == 0:
                raise RuntimeError("the feature statistics are empty: call estimate() before attributing")
            mean = self.total / self.count
            var = (self.total_sq / self.count - mean.square()).clamp_min(0.0)
            active = (self.nonzero / self.count) > self.active_threshold
            self._derived = (mean.float(), var.sqrt().clamp_min(self.min_std).float(), active)
        return self._derived

    @property
    def mean(self) -> torch.Tensor:
        """μ: (C, h, w), float32."""
        return self._derive()[0]

    @property
    def std(self) -> torch.Tensor:
        """σ: (C, h, w), float32, floored at ``min_std`` so dead units never divide by zero."""
        return self._derive()[1]

    @property
    def active(self) -> torch.Tensor:
        """(C, h, w) bool: units non-zero in more than ``active_threshold`` of the samples."""
        return self._derive()[2]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of size 2·round(2σ)+1, summing to 1 (paper eq. 7)."""
    radius = round(2 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel of x (B, C, h, w) with reflection padding.

    The kernel sums to 1, so blur(1 − s) = 1 − blur(s): callers blur sigmoid(−α) to get 1 − λ
    without cancellation when λ is close to 1.
    """
    if sigma <= 0:
        return x
    kernel = gaussian_kernel(sigma).to(x)
    radius = kernel.numel() // 2
    channels = x.shape[1]
    if radius >= min(x.shape[-2:]):
        raise ValueError(f"smoothing sigma {sigma} is too large for a {tuple(x.shape[-2:])} feature map")
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), cols, groups=channels)


def kl_divergence(r: torch.Tensor, lam: torch.Tensor, one_minus_lam: torch.Tensor) -> torch.Tensor:
    """Per-element information D_KL(P(Z|R) || N(μ, σ²)) in nats (paper eq. 5).

    r: (B, C, h, w) normalised activations (R − μ)/σ; lam and one_minus_lam: λ and 1 − λ, same shape.
    """
    return -0.5 * (1 + 2 * torch.log(one_minus_lam) - (lam * r) ** 2 - one_minus_lam**2)


class InformationBottleneck(nn.Module):
    """Replaces R by Z = λ·R + (1 − λ)·ε and measures the information that passes, per element.

    Holds the statistics of R (μ, σ, active units) and the smoothing σ_s; has no trainable
    parameters: α comes from the per-sample optimiser or from the readout network.
    Inactive units (almost always zero over the data) output zeros without noise and carry no
    information, so dead ReLUs neither leak noise nor produce NaN.
    """

    def __init__(self, statistics: FeatureStatistics, sigma: float = 1.0) -> None:
        super().__init__()
        self.statistics = statistics
        self.sigma = sigma

    def lambdas(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α (B, C, h, w) -> (λ, 1 − λ), both smoothed (eq. 7). 1 − λ never rounds to 0 in float32."""
        lam = blur(torch.sigmoid(alpha), self.sigma)
        one_minus = blur(torch.sigmoid(-alpha), self.sigma).clamp_min(torch.finfo(alpha.dtype).tiny)
        return lam, one_minus

    def normalised(self, features: torch.Tensor) -> torch.Tensor:
        """r = (R − μ)/σ, (B, C, h, w)."""
        return (features - self.statistics.mean) / self.statistics.std

    def information(self, features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Per-element KL (B, C, h, w) in nats, zero on inactive units."""
        lam, one_minus = self.lambdas(alpha)
        kl = kl_divergence(self.normalised(features), lam, one_minus)
        return kl * self.statistics.active

    def forward(
        self, features: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Injects noise and returns (Z, KL in nats).

        features: R (B, C, h, w); alpha: (B, C, h, w); noise: standard normal, (B, C, h, w) or
        (B, S, C, h, w) for S noise copies per sample. Z has the shape of ``noise`` with the copies
        folded into the batch, (B·S, C, h, w); KL is (B, C, h, w) (it does not depend on the noise).
        """
        lam, one_minus = self.lambdas(alpha)
        mean, std, active = self.statistics.mean, self.statistics.std, self.statistics.active
        kl = kl_divergence((features - mean) / std, lam, one_minus) * active
        if noise.dim() == 5:
            features, lam, one_minus = features[:, None], lam[:, None], one_minus[:, None]
        z = (lam * features + one_minus * (mean + std * noise)) * active
        return z.flatten(0, 1) if noise.dim() == 5 else z, kl


def information_map(kl: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Heatmap in bits per pixel: (B, C, h, w) nats -> (B, H, W) bits.

    The KL is summed over channels and converted to bits, then resized to ``size`` with bilinear
    interpolation (align_corners=False, i.e. pixel centres aligned as in ``F.interpolate``), and
    finally rescaled so that every map sums to the information that passed the bottleneck for that
    image: the paper's "bits per pixel", whose total over the image is the image's total bits.
    """
    bits = kl.sum(1, keepdim=True) / LN2
    total = bits.sum(dim=(1, 2, 3), keepdim=True)
    resized = F.interpolate(bits, size=size, mode="bilinear", align_corners=False)
    scale = total / resized.sum(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(kl.dtype).tiny)
    return (resized * scale)[:, 0]
