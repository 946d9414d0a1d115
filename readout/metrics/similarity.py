"""How alike two heatmaps are: Pearson and Spearman correlation, and SSIM (Wang et al., 2004).

Used by the weight-randomisation sanity check (IBA paper, App. G.3) and, for Pearson, by Sensitivity-n.
All functions compare per image and return (B,); a correlation with a constant input is NaN.

``ssim`` with the default uniform 5 x 5 window equals scikit-image's
``structural_similarity(a, b, win_size=5, data_range=1)`` as the paper used it: local means,
variances (sample, N - 1) and covariance over each window lying fully inside the image, K1 = 0.01,
K2 = 0.03, averaged over those windows. The paper applies it to heatmaps clamped to their 1st and 99th
percentile and scaled to [0, 1] (:func:`normalise_map`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y (..., N) -> (...): the Pearson correlation along the last axis; NaN if either is constant."""
    x, y = torch.broadcast_tensors(x, y)
    xc, yc = x - x.mean(dim=-1, keepdim=True), y - y.mean(dim=-1, keepdim=True)
    r = (xc * yc).sum(dim=-1) / ((xc * xc).sum(dim=-1) * (yc * yc).sum(dim=-1)).sqrt()
    constant = (x.amax(dim=-1) == x.amin(dim=-1)) | (y.amax(dim=-1) == y.amin(dim=-1))
    return r.masked_fill(constant, float("nan"))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """x (B, N) -> (B, N) float: 0-based ranks along the last axis, ties given their average rank."""
    ordered, order = x.sort(dim=-1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.cumsum(dim=-1) - 1
    positions = torch.arange(x.shape[-1], dtype=torch.float64, device=x.device).expand_as(group)
    total = torch.zeros_like(positions).scatter_add_(-1, group, positions)
    size = torch.zeros_like(positions).scatter_add_(-1, group, torch.ones_like(positions))
    mean_rank = total.gather(-1, group) / size.gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (B, H, W) -> (B,): Spearman's rank correlation per image (Pearson of average ranks)."""
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1))).to(a.dtype)


def normalise_map(maps: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """maps (B, H, W) -> (B, H, W) in [0, 1]: clamped to their ``low`` and ``high`` quantiles per image
    (linear interpolation, as numpy's percentile), then scaled; a map with equal quantiles becomes 0."""
    flat = maps.flatten(1).to(torch.promote_types(maps.dtype, torch.float32))
    bounds = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype, device=flat.device), dim=1)
    lo, hi = bounds[0, :, None], bounds[1, :, None]
    span = hi - lo
    scaled = (torch.minimum(torch.maximum(flat, lo), hi) - lo) / torch.where(span > 0, span, 1)
    return scaled.view_as(maps)


def _window(size: int, gaussian: bool, sigma: float) -> torch.Tensor:
    if size < 2:
        raise ValueError(f"SSIM window size must be at least 2, got {size}")
    if not gaussian:
        return torch.full((size, size), 1.0 / size**2, dtype=torch.float64)
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    window_size: int = 5,
    gaussian: bool = False,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """a, b (B, H, W) with values spanning ``data_range`` -> (B,): mean SSIM over all full windows.

    Window: uniform ``window_size``^2 (default, as skimage), or a normalised Gaussian of std ``sigma``
    px truncated to ``window_size``. Computed in float64; needs H, W >= ``window_size``.
    """
    window = _window(window_size, gaussian, sigma).to(a.device)[None, None]
    x, y = a[:, None].double(), b[:, None].double()

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window)

    n = window_size**2
    cov_norm = n / (n - 1)  # sample covariance, as skimage's default use_sample_covariance=True
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = cov_norm * (local_mean(x * x) - mu_x * mu_x)
    var_y = cov_norm * (local_mean(y * y) - mu_y * mu_y)
    cov = cov_norm * (local_mean(x * y) - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3)).to(a.dtype)
