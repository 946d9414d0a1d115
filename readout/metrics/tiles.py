"""Square tiles of pixels, the unit that degradation and Sensitivity-n remove, and what replaces them.

Convention: ``tile`` is the side of a tile **in pixels**. The IBA paper's "8x8 and 14x14 tiles" on
224 px ImageNet images are tiles of 8 x 8 px (28 x 28 = 784 tiles) and 14 x 14 px (16 x 16 = 256
tiles); on the 64 px synthetic images, ``tile=8`` gives 8 x 8 = 64 tiles. Tiles are numbered in raster
order (row by row, left to right). When the image side is not a multiple of ``tile``, the last row and
column of tiles are cut short (ceil division): every pixel belongs to exactly one tile.

Removing a tile replaces its pixels by a baseline: ``"mean"`` (each image's per-channel mean, the
default of the degradation benchmark), ``"zero"`` (black, since images are in [0, 1]), a float
constant, or a tensor that broadcasts to the images (B, 3, H, W).
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["mean", "zero"] | float | torch.Tensor


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles covering an image of ``height`` x ``width`` px with ``tile`` px tiles."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    return -(-height // tile), -(-width // tile)


def num_tiles(height: int, width: int, tile: int) -> int:
    """T, the number of tiles of ``tile`` x ``tile`` px covering an image of ``height`` x ``width`` px."""
    rows, cols = tile_grid(height, width, tile)
    return rows * cols


def tile_index(height: int, width: int, tile: int, device: torch.device | None = None) -> torch.Tensor:
    """(H, W) long: the raster-order number of the tile each pixel belongs to, in [0, T)."""
    _, cols = tile_grid(height, width, tile)
    rows_of = torch.arange(height, device=device) // tile
    cols_of = torch.arange(width, device=device) // tile
    return rows_of[:, None] * cols + cols_of[None, :]


def tile_sums(attributions: torch.Tensor, tile: int) -> torch.Tensor:
    """attributions (B, H, W) -> (B, T): the summed attribution of each tile, raster order."""
    batch, height, width = attributions.shape
    index = tile_index(height, width, tile, attributions.device).flatten()
    sums = attributions.new_zeros(batch, num_tiles(height, width, tile))
    return sums.index_add_(1, index, attributions.flatten(1))


def tiles_to_pixels(tile_values: torch.Tensor, height: int, width: int, tile: int) -> torch.Tensor:
    """(N, T) per-tile values -> (N, H, W): each pixel takes its tile's value (masks, ranks)."""
    index = tile_index(height, width, tile, tile_values.device)
    return tile_values[:, index]


def baseline_images(images: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """images (B, 3, H, W) -> the values removed pixels take, broadcastable to (B, 3, H, W)."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True)
    if baseline == "zero":
        return images.new_zeros(1, 1, 1, 1)
    if isinstance(baseline, int | float):
        return images.new_full((1, 1, 1, 1), float(baseline))
    raise ValueError(f"baseline must be 'mean', 'zero', a float or a tensor, got {baseline!r}")


def remove_pixels(images: torch.Tensor, removed: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """images (N, 3, H, W), removed (N, H, W) bool, replacement broadcastable -> degraded (N, 3, H, W)."""
    return torch.where(removed[:, None], replacement, images)


def check_maps(images: torch.Tensor, attributions: torch.Tensor) -> None:
    """Raises unless attributions are (B, H, W) for images (B, C, H, W)."""
    expected = (images.shape[0], *images.shape[2:])
    if images.dim() != 4 or tuple(attributions.shape) != expected:
        raise ValueError(
            f"attributions must be (B, H, W) = {expected} for images {tuple(images.shape)}, "
            f"got {tuple(attributions.shape)}"
        )
