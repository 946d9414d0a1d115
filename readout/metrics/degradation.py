"""The degradation benchmark: MoRF and LeRF curves and the area between them (IBA paper, Sec. 4.6, eq. 8).

The image is cut into tiles (see :mod:`readout.metrics.tiles` for the pixel convention), the tiles are
ranked by their summed attribution, and removed one after another, replaced by a baseline: most
relevant first (MoRF) or least relevant first (LeRF). After each step the target's softmax probability
is measured; a curve has T + 1 points, from 0 to all T tiles removed.

Ties: tiles are ranked by a *stable* sort, so tiles of equal summed attribution are removed in raster
order in both directions (MoRF: descending score, ties top-left first; LeRF: ascending score, ties
also top-left first). LeRF is therefore not the reversed MoRF order where ties exist.

Scaling (eq. 8): s(x) = (p(y|x) - b) / (t1 - b), with t1 the mean top-1 probability on the original
images and b the mean target probability on the fully degraded images, both over the evaluated set.
The score is the area between the scaled LeRF and MoRF curves, x-axis (fraction of tiles removed)
normalised to [0, 1], trapezoidal rule. Since s is affine, it equals the area between the mean raw
curves divided by (t1 - b): :class:`Degradation` only keeps sums, which add up across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from readout.metrics.aggregate import standard_error
from readout.metrics.chunks import logits_of, map_chunks, resolve_targets
from readout.metrics.tiles import (
    Baseline,
    baseline_images,
    check_maps,
    num_tiles,
    remove_pixels,
    tile_index,
    tile_sums,
)


def tile_ranks(attributions: torch.Tensor, tile: int, most_relevant_first: bool = True) -> torch.Tensor:
    """attributions (B, H, W) -> (B, T) long: the step (0-based) at which each tile is removed.

    Tiles are ordered by summed attribution, descending for MoRF and ascending for LeRF, with a stable
    sort: ties keep raster order. After k steps the tiles with rank < k are removed.
    """
    scores = tile_sums(attributions, tile)
    order = scores.sort(dim=1, descending=most_relevant_first, stable=True).indices
    steps = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, steps)


def degradation_curves(
    model: nn.Module,
    images: torch.Tensor,
    attributions: torch.Tensor,
    targets: torch.Tensor | None,
    tile: int,
    baseline: Baseline = "mean",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoRF and LeRF curves: the target's softmax probability after k = 0 .. T tiles are removed.

    images: (B, 3, H, W) in [0, 1]; attributions: (B, H, W), any sign; targets: (B,) class indices, or
    None for the model's predicted classes; tile: tile side in px. Runs 2T forward passes per image,
    ``chunk_size`` images each (k = 0 and k = T are shared by both curves, so their ends agree exactly).
    Returns ``(morf, lerf)``, each (B, T + 1), probabilities in [0, 1].
    """
    check_maps(images, attributions)
    attributions = attributions.detach().to(images.device)
    batch, _, height, width = images.shape
    count = num_tiles(height, width, tile)
    targets = resolve_targets(model, images, targets, chunk_size)
    ranks = torch.stack([tile_ranks(attributions, tile, True), tile_ranks(attributions, tile, False)])
    replacement = torch.broadcast_to(baseline_images(images, baseline), images.shape)
    pixel_tile = tile_index(height, width, tile, images.device)
    # Steps per image: MoRF k = 0 .. T, then LeRF k = 1 .. T-1 (its ends equal MoRF's).
    direction = torch.cat([torch.zeros(count + 1), torch.ones(count - 1)]).long().to(images.device)
    removed = torch.cat([torch.arange(count + 1), torch.arange(1, count)]).to(images.device)
    steps = direction.numel()

    def make_inputs(jobs: torch.Tensor) -> torch.Tensor:
        image, step = jobs // steps, jobs % steps
        tiles_removed = ranks[direction[step], image] < removed[step, None]
        return remove_pixels(images[image], tiles_removed[:, pixel_tile], replacement[image])

    def read_outputs(logits: torch.Tensor, jobs: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1).gather(1, targets[jobs // steps, None])[:, 0]

    values = map_chunks(model, batch * steps, make_inputs, read_outputs, chunk_size, images.device)
    values = values.view(batch, steps)
    morf = values[:, : count + 1]
    lerf = torch.cat([morf[:, :1], values[:, count + 1 :], morf[:, count:]], dim=1)
    return morf, lerf


def top1_probability(model: nn.Module, images: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """images (B, 3, H, W) -> (B,): the highest softmax probability per image (t1's summand in eq. 8)."""
    return logits_of(model, images, chunk_size).softmax(dim=1).amax(dim=1)


def scaled_degradation(morf: torch.Tensor, lerf: torch.Tensor, top1: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 8 and the score from *mean* curves: morf, lerf (T + 1,) and top1 () averaged over a set.

    Returns ``score`` () (area between scaled LeRF and MoRF, x in [0, 1]), the scaled mean curves
    ``morf`` and ``lerf`` (T + 1,), ``fraction`` (T + 1,) of tiles removed, ``t1`` and ``b`` ().
    """
    steps = morf.shape[0] - 1
    b = morf[-1]
    scale = top1 - b
    scaled_morf, scaled_lerf = (morf - b) / scale, (lerf - b) / scale
    fraction = torch.arange(steps + 1, dtype=morf.dtype, device=morf.device) / max(steps, 1)
    score = torch.trapezoid(scaled_lerf - scaled_morf, fraction)
    return {
        "score": score,
        "morf": scaled_morf,
        "lerf": scaled_lerf,
        "fraction": fraction,
        "t1": top1,
        "b": b,
    }


def degradation_score(morf: torch.Tensor, lerf: torch.Tensor, top1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The score of one set: morf, lerf (B, T + 1), top1 (B,) -> see :func:`scaled_degradation`."""
    return scaled_degradation(morf.mean(dim=0), lerf.mean(dim=0), top1.mean())


def image_areas(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """(B,) float64: each image's area between its raw LeRF and MoRF curves (B, T + 1), x in [0, 1];
    divided by t1 − b of its set it is that image's share of eq. 8's score."""
    fraction = torch.linspace(0, 1, morf.shape[1], dtype=torch.float64, device=morf.device)
    return torch.trapezoid(lerf.double() - morf.double(), fraction, dim=1)


class Degradation(Metric):
    """Accumulates MoRF/LeRF curves over batches and ranks; ``compute`` gives eq. 8's scaled score.

    ``update(morf, lerf, top1)`` with the outputs of :func:`degradation_curves` (B, T + 1) and
    :func:`top1_probability` (B,). States are sums (float64) reduced by summation, so any split of the
    data over batches and ranks gives the same score. ``compute`` returns :func:`scaled_degradation`'s
    dict plus ``count``, the number of images, and ``score_se``: the standard error of the score over
    images, from each image's area between its raw LeRF and MoRF curves (the score is their mean
    divided by t1 − b), with t1 and b taken as fixed.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    morf_sum: torch.Tensor
    lerf_sum: torch.Tensor
    top1_sum: torch.Tensor
    area_sum: torch.Tensor
    area_squares: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_tiles: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_tiles < 1:
            raise ValueError(f"num_tiles must be positive, got {num_tiles}")
        self.num_tiles = num_tiles
        curve = torch.zeros(num_tiles + 1, dtype=torch.float64)
        self.add_state("morf_sum", default=curve.clone(), dist_reduce_fx="sum")
        self.add_state("lerf_sum", default=curve.clone(), dist_reduce_fx="sum")
        self.add_state("top1_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("area_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("area_squares", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, morf: torch.Tensor, lerf: torch.Tensor, top1: torch.Tensor) -> None:
        expected = (top1.shape[0], self.num_tiles + 1)
        if tuple(morf.shape) != expected or tuple(lerf.shape) != expected:
            raise ValueError(f"morf and lerf must be (B, T + 1) = {expected}, got {morf.shape}, {lerf.shape}")
        self.morf_sum += morf.double().sum(dim=0)
        self.lerf_sum += lerf.double().sum(dim=0)
        self.top1_sum += top1.double().sum()
        areas = image_areas(morf, lerf)
        self.area_sum += areas.sum()
        self.area_squares += areas.square().sum()
        self.count += top1.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        summary = scaled_degradation(
            self.morf_sum / self.count, self.lerf_sum / self.count, self.top1_sum / self.count
        )
        error = standard_error(self.area_sum, self.area_squares, self.count) / (summary["t1"] - summary["b"])
        return {**summary, "score_se": error.abs(), "count": self.count}
