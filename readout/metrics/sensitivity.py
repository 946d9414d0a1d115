"""Sensitivity-n (Ancona et al., 2018) with tiles, as in the IBA paper (Sec. 4.4, App. G.1, eq. 16).

For each n, ``num_masks`` random sets T_n of n tiles are drawn, *shared by all images*. Per image and
set, the drop of the target logit when the tiles are removed, S_c(x) - S_c(x with T_n removed), is
paired with the attribution summed over T_n; eq. 16 is their Pearson correlation over the sets, per
image, then averaged over images. n counts tiles (n * tile^2 pixels, tiles of ``tile`` px; the paper
uses 8 px tiles and n log-spaced from 1 to 80% of the image).

Masks: the sets for a given n depend only on (seed, n, T, num_masks), drawn by a CPU
``torch.Generator`` seeded with the first 4 bytes of sha256(f"{seed}:{n}") (the CPU generator uses
only 32 bits of a seed); so they are the same on every batch, rank and device, and adding a value of
n does not change the sets of the others.

Removed tiles take the ``baseline`` value. The paper sets pixels "to zero" in the model's normalised
input; here images are in [0, 1] and normalised inside the model, so ``"zero"`` (default) is black and
``"mean"`` is each image's channel mean. A correlation over sets whose attribution sums (or logit
drops) are all equal is undefined: NaN, left out of the mean over images.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from readout.metrics.aggregate import ImageMeans
from readout.metrics.chunks import logits_of, map_chunks
from readout.metrics.similarity import pearson
from readout.metrics.tiles import (
    Baseline,
    baseline_images,
    check_maps,
    num_tiles,
    remove_pixels,
    tile_index,
    tile_sums,
)


def log_spaced_counts(total: int, points: int = 16, max_fraction: float = 0.8) -> torch.Tensor:
    """(N,) long, increasing, unique: about ``points`` counts log-spaced from 1 to max_fraction * total."""
    high = max(1, int(max_fraction * total))
    return torch.logspace(0, math.log10(high), points, dtype=torch.float64).round().long().unique()


def _mask_seed(seed: int, n: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:4], "little")


def random_tile_masks(ns: torch.Tensor, num_tiles: int, num_masks: int, seed: int = 0) -> torch.Tensor:
    """(N, M, T) bool on the CPU: for each n in ``ns``, ``num_masks`` random sets of exactly n tiles."""
    masks = []
    for n in ns.tolist():
        if not 0 <= n <= num_tiles:
            raise ValueError(f"n must lie in [0, {num_tiles}] tiles, got {n}")
        generator = torch.Generator().manual_seed(_mask_seed(seed, n))
        keys = torch.rand(num_masks, num_tiles, generator=generator, dtype=torch.float64)
        masks.append(keys.argsort(dim=1).argsort(dim=1) < n)
    return torch.stack(masks)


def sensitivity_drops(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None,
    tile: int,
    ns: torch.Tensor,
    num_masks: int = 100,
    seed: int = 0,
    baseline: Baseline = "zero",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward-pass half of eq. 16, which does not depend on the attribution, so that several
    methods can share it: (masks (N, M, T) bool, target-logit drops (B, N, M)).

    images (B, 3, H, W) in [0, 1]; targets (B,) or None for the predicted class; tile: tile side in
    px; ns: tile counts. Runs N * num_masks forward passes per image, ``chunk_size`` images each.
    """
    batch, _, height, width = images.shape
    total = num_tiles(height, width, tile)
    masks = random_tile_masks(ns, total, num_masks, seed).to(images.device)
    sets = masks.view(-1, total)  # (N * M, T)
    logits = logits_of(model, images, chunk_size)
    targets = logits.argmax(dim=1) if targets is None else targets.to(images.device, torch.long)
    original = logits.gather(1, targets[:, None])[:, 0]
    replacement = torch.broadcast_to(baseline_images(images, baseline), images.shape)
    pixel_tile = tile_index(height, width, tile, images.device)

    def make_inputs(jobs: torch.Tensor) -> torch.Tensor:
        image, which = jobs // sets.shape[0], jobs % sets.shape[0]
        return remove_pixels(images[image], sets[which][:, pixel_tile], replacement[image])

    def read_outputs(logits: torch.Tensor, jobs: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, targets[jobs // sets.shape[0], None])[:, 0]

    masked = map_chunks(model, batch * sets.shape[0], make_inputs, read_outputs, chunk_size, images.device)
    return masks, original[:, None, None] - masked.view(batch, *masks.shape[:2])


def correlations_from_drops(
    attributions: torch.Tensor, tile: int, masks: torch.Tensor, drops: torch.Tensor
) -> torch.Tensor:
    """The attribution half of eq. 16: (B, N) Pearson correlations over the M sets, per image and n,
    between the attribution summed over each removed set and the logit drop of
    :func:`sensitivity_drops`."""
    attributions = attributions.detach().to(drops.device)
    removed = torch.einsum("bt,nmt->bnm", tile_sums(attributions, tile), masks.to(attributions.dtype))
    return pearson(removed, drops.to(removed.dtype))


def sensitivity_n_correlations(
    model: nn.Module,
    images: torch.Tensor,
    attributions: torch.Tensor,
    targets: torch.Tensor | None,
    tile: int,
    ns: torch.Tensor | None = None,
    num_masks: int = 100,
    seed: int = 0,
    baseline: Baseline = "zero",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 16 per image: returns (ns (N,) long, correlations (B, N)).

    Arguments as :func:`sensitivity_drops`; attributions (B, H, W); ns defaults to
    :func:`log_spaced_counts`.
    """
    check_maps(images, attributions)
    _, _, height, width = images.shape
    total = num_tiles(height, width, tile)
    ns = log_spaced_counts(total) if ns is None else torch.as_tensor(ns, dtype=torch.long)
    masks, drops = sensitivity_drops(model, images, targets, tile, ns, num_masks, seed, baseline, chunk_size)
    return ns, correlations_from_drops(attributions, tile, masks, drops)


def sensitivity_n(
    model: nn.Module,
    images: torch.Tensor,
    attributions: torch.Tensor,
    targets: torch.Tensor | None,
    tile: int,
    ns: torch.Tensor | None = None,
    num_masks: int = 100,
    seed: int = 0,
    baseline: Baseline = "zero",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sensitivity-n curve of one set: (ns (N,) tiles, mean correlation over images (N,)).

    Arguments as :func:`sensitivity_n_correlations`; images whose correlation is NaN are left out.
    """
    ns, correlations = sensitivity_n_correlations(
        model, images, attributions, targets, tile, ns, num_masks, seed, baseline, chunk_size
    )
    return ns, correlations.nanmean(dim=0)


class SensitivityN(ImageMeans):
    """Mean Sensitivity-n correlation per n over batches and ranks.

    ``update(correlations)`` with (B, N) from :func:`sensitivity_n_correlations` for the same ``ns``;
    ``compute`` returns ``{"n": (N,) tiles, "correlation": (N,), "count": (N,) images}``.
    """

    higher_is_better = True

    def __init__(self, ns: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(len(ns), **kwargs)
        self.ns = torch.as_tensor(ns, dtype=torch.long).clone()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"n": self.ns, "correlation": self.means(), "count": self.counts}
