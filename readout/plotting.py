"""Pictures of heatmaps: overlays with a colour bar in bits, and grids for TensorBoard and reports.

Figures are matplotlib's ``Figure`` objects, saved by its Agg canvas, never pyplot's: drawing one
neither switches the caller's backend (a notebook's stays as it was) nor registers a global figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure


@dataclass(frozen=True)
class ColourScale:
    """How a heatmap's values become colours: the colour map and the values at its two ends."""

    cmap: str
    vmin: float
    vmax: float


def colour_scale(heatmap: np.ndarray, symmetric: bool) -> ColourScale:
    """Signed maps: a diverging map centred on zero, ±max|value|; others: 0 to the maximum."""
    if symmetric:
        bound = float(np.abs(heatmap).max()) or 1.0
        return ColourScale("bwr", -bound, bound)
    return ColourScale("inferno", 0.0, float(heatmap.max()) or 1.0)


def _draw_pair(
    figure: Figure,
    left: Axes,
    right: Axes,
    image: torch.Tensor,
    heatmap: torch.Tensor,
    symmetric: bool,
    unit: str,
) -> ColourScale:
    """The image on ``left``, the heatmap over its gray version on ``right`` with a colour bar."""
    picture = image.detach().cpu().permute(1, 2, 0).numpy()
    values = heatmap.detach().cpu().float().numpy()
    scale = colour_scale(values, symmetric)
    left.imshow(picture)
    left.set_axis_off()
    right.imshow(picture.mean(axis=2), cmap="gray", vmin=0, vmax=1)
    shown = right.imshow(values, cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax, alpha=0.75)
    right.set_axis_off()
    figure.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label=unit)
    return scale


def save_heatmap_png(
    path: str | Path,
    image: torch.Tensor,
    heatmap: torch.Tensor,
    title: str = "",
    symmetric: bool = False,
    unit: str = "bits per pixel",
) -> ColourScale:
    """The image (3, H, W) in [0, 1] beside the heatmap (H, W) over it, with a colour bar in ``unit``.

    Signed maps (Relevance-IBA) use a symmetric diverging colour map centred on zero. Returns the
    colour scale drawn.
    """
    figure = Figure(figsize=(7, 3.2))
    left, right = figure.subplots(1, 2)
    scale = _draw_pair(figure, left, right, image, heatmap, symmetric, unit)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return scale


def save_heatmap_sheet(
    path: str | Path,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    titles: list[str],
    columns: int = 2,
    symmetric: bool = False,
    unit: str = "bits per pixel",
) -> None:
    """Several (image, heatmap) pairs as :func:`save_heatmap_png` draws one, ``columns`` pairs a row,
    each with its own colour bar and title: images (B, 3, H, W), heatmaps (B, H, W)."""
    count = len(images)
    rows = -(-count // columns)
    figure = Figure(figsize=(7 * columns, 3.2 * rows))
    axes = figure.subplots(rows, 2 * columns, squeeze=False)
    for i in range(rows * columns):
        left, right = axes[i // columns, 2 * (i % columns)], axes[i // columns, 2 * (i % columns) + 1]
        if i >= count:
            left.set_axis_off()
            right.set_axis_off()
            continue
        _draw_pair(figure, left, right, images[i], heatmaps[i], symmetric, unit)
        left.set_title(titles[i], fontsize=9, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """(3, H, W) image and (H, W) map -> (3, H, W) float picture: the map coloured over the gray image."""
    values = heatmap.detach().cpu().float().numpy()
    scale = colour_scale(values, symmetric)
    span = scale.vmax - scale.vmin + 1e-12
    colours = colormaps[scale.cmap]((values - scale.vmin) / span)[..., :3]
    gray = image.detach().cpu().mean(0, keepdim=True).permute(1, 2, 0).numpy()
    mixed = 0.35 * gray + 0.65 * colours
    return torch.from_numpy(mixed).permute(2, 0, 1).float().clamp(0, 1)


def heatmap_grid(images: torch.Tensor, heatmaps: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """(B, 3, H, W) images over (B, H, W) maps -> (3, 2H, B·W): images on top, overlays below."""
    top = torch.cat(list(images.detach().cpu().float()), dim=2)
    bottom = torch.cat([overlay(i, h, symmetric) for i, h in zip(images, heatmaps, strict=True)], dim=2)
    return torch.cat([top, bottom], dim=1)
