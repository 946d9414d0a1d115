"""Does the attribution fall on the object? Boxes (IBA paper, Sec. 4.5) and masks (Relevance-IBA).

Top-n ratio (paper 4.5): with n pixels in the region, the share of the n highest-scored pixels that lie
inside it; 1 for an attribution equal to the region, 0 for its complement (when n <= H W / 2). Ties:
pixels are ranked by a *stable* descending sort, so among equal scores the earlier pixel in raster
order (row by row) ranks higher. A constant map therefore selects the first n pixels in raster order.
The paper evaluates boxes only where they cover less than 33% of the image; :func:`box_ratio` returns
that validity flag.

Mass inside (paper G.2's alternative, and Relevance-IBA's "important pixels within the object
segments"): the share of *positive* attribution mass, sum(max(a, 0) in region) / sum(max(a, 0)).

Boundary scores (Relevance-IBA claims sharper object contours). Bands of ``width`` px on either side of
the mask's boundary, with the chessboard distance (a (2 width + 1)^2 square structuring element):
``inner`` = mask pixels within ``width`` px of a non-mask pixel, ``outer`` = non-mask pixels within
``width`` px of a mask pixel. The image border is not a boundary: pixels outside the image count as
neither. ``boundary_sharpness`` = positive mass in inner / (inner + outer): 1 when the attribution stops
exactly at the contour, about 0.5 when it is blurred evenly across it, below 0.5 when it misses the
object. ``boundary_share`` = positive mass in inner | outer / all positive mass: how much of the map
traces the contour.

Undefined scores are NaN (no region, no positive mass); :class:`Localisation` leaves them out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from readout.metrics.aggregate import ImageMeans


def _check_region(attributions: torch.Tensor, region: torch.Tensor) -> None:
    if attributions.dim() != 3 or attributions.shape != region.shape or region.dtype != torch.bool:
        raise ValueError(
            f"attributions (B, H, W) and a bool region of the same shape are needed, got "
            f"{tuple(attributions.shape)} and {tuple(region.shape)} {region.dtype}"
        )


def _float(attributions: torch.Tensor) -> torch.dtype:
    return attributions.dtype if attributions.is_floating_point() else torch.get_default_dtype()


def top_n_ratio(attributions: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """attributions (B, H, W), region (B, H, W) bool -> (B,) in [0, 1]: share of the top-n pixels inside.

    n = number of region pixels per image; ties broken by raster order (stable sort). NaN when n = 0.
    """
    _check_region(attributions, region)
    flat, inside = attributions.flatten(1), region.flatten(1)
    n = inside.sum(dim=1)
    order = flat.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    hits = ((ranks < n[:, None]) & inside).sum(dim=1)
    return hits.to(_float(attributions)) / n


def mass_inside(attributions: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B,) in [0, 1]: positive attribution mass inside the region / all positive mass; NaN if none."""
    _check_region(attributions, region)
    positive = attributions.clamp(min=0).to(_float(attributions)).flatten(1)
    return (positive * region.flatten(1)).sum(dim=1) / positive.sum(dim=1)


def coverage(region: torch.Tensor) -> torch.Tensor:
    """region (B, H, W) bool -> (B,): the fraction of the image it covers."""
    return region.flatten(1).float().mean(dim=1)


def box_ratio(
    attributions: torch.Tensor, box_mask: torch.Tensor, max_coverage: float = 0.33
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's bounding-box score: (ratio (B,), valid (B,) bool).

    ``valid``: the boxes cover more than nothing and less than ``max_coverage`` of the image (paper:
    33%); only valid images enter the paper's mean.
    """
    share = coverage(box_mask)
    return top_n_ratio(attributions, box_mask), (share > 0) & (share < max_coverage)


def dilate(mask: torch.Tensor, width: int) -> torch.Tensor:
    """mask (B, H, W) bool -> pixels within ``width`` px (chessboard distance) of a mask pixel."""
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    grown = F.max_pool2d(mask[:, None].float(), 2 * width + 1, stride=1, padding=width)
    return grown[:, 0] > 0


def boundary_bands(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, H, W) bool -> (inner, outer) bands of ``width`` px on either side of its boundary."""
    eroded = ~dilate(~mask, width)
    return mask & ~eroded, dilate(mask, width) & ~mask


def boundary_sharpness(attributions: torch.Tensor, mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """(B,) in [0, 1]: positive mass in the inner band / in both bands; NaN if the bands hold none."""
    _check_region(attributions, mask)
    inner, outer = boundary_bands(mask, width)
    positive = attributions.clamp(min=0).to(_float(attributions))
    inside = (positive * inner).flatten(1).sum(dim=1)
    return inside / (inside + (positive * outer).flatten(1).sum(dim=1))


def boundary_share(attributions: torch.Tensor, mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """(B,) in [0, 1]: positive mass within ``width`` px of the mask's boundary / all positive mass."""
    inner, outer = boundary_bands(mask, width)
    return mass_inside(attributions, inner | outer)


#: The columns of :func:`localisation_scores` and :class:`Localisation`, in order.
LOCALISATION_SCORES = (
    "box_ratio",
    "box_mass",
    "mask_ratio",
    "mask_mass",
    "boundary_sharpness",
    "boundary_share",
)


def localisation_scores(
    attributions: torch.Tensor,
    box_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
    has_mask: torch.Tensor | None = None,
    max_box_coverage: float = 0.33,
    boundary_width: int = 2,
) -> dict[str, torch.Tensor]:
    """Every localisation score per image, (B,) each, NaN where it does not apply.

    Box scores (``box_ratio``, ``box_mass``) apply where the boxes cover less than
    ``max_box_coverage``; mask scores where ``has_mask`` (all images when ``mask`` is given without
    ``has_mask``; none when ``mask`` is None).
    """
    nan = torch.tensor(float("nan"), dtype=_float(attributions), device=attributions.device)
    ratio, box_valid = box_ratio(attributions, box_mask, max_box_coverage)
    scores = {"box_ratio": ratio, "box_mass": mass_inside(attributions, box_mask)}
    scores = {name: torch.where(box_valid, value, nan) for name, value in scores.items()}
    if mask is None:
        return scores | {name: nan.expand(attributions.shape[0]) for name in LOCALISATION_SCORES[2:]}
    if has_mask is None:
        has_mask = torch.ones(attributions.shape[0], dtype=torch.bool, device=attributions.device)
    mask_scores = {
        "mask_ratio": top_n_ratio(attributions, mask),
        "mask_mass": mass_inside(attributions, mask),
        "boundary_sharpness": boundary_sharpness(attributions, mask, boundary_width),
        "boundary_share": boundary_share(attributions, mask, boundary_width),
    }
    return scores | {name: torch.where(has_mask, value, nan) for name, value in mask_scores.items()}


class Localisation(ImageMeans):
    """Means of :func:`localisation_scores` over the images where each applies, across batches and ranks.

    ``update(attributions, box_mask, mask=None, has_mask=None)``; ``compute`` returns ``{score: mean}``,
    ``{score + "_se": its standard error over images}`` and ``{score + "_count": number of images}`` for
    every name in :data:`LOCALISATION_SCORES`.
    """

    higher_is_better = True

    def __init__(self, max_box_coverage: float = 0.33, boundary_width: int = 2, **kwargs: Any) -> None:
        super().__init__(len(LOCALISATION_SCORES), **kwargs)
        self.max_box_coverage = max_box_coverage
        self.boundary_width = boundary_width

    def update(  # type: ignore[override]
        self,
        attributions: torch.Tensor,
        box_mask: torch.Tensor,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> None:
        scores = localisation_scores(
            attributions, box_mask, mask, has_mask, self.max_box_coverage, self.boundary_width
        )
        super().update(torch.stack([scores[name] for name in LOCALISATION_SCORES], dim=1))

    def compute(self) -> dict[str, torch.Tensor]:
        means, errors = self.means(), self.standard_errors()
        return {
            **{name: means[i] for i, name in enumerate(LOCALISATION_SCORES)},
            **{f"{name}_se": errors[i] for i, name in enumerate(LOCALISATION_SCORES)},
            **{f"{name}_count": self.counts[i] for i, name in enumerate(LOCALISATION_SCORES)},
        }
