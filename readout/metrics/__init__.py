"""Evaluation metrics for attribution maps: tensors in, numbers out (IBA paper, Sec. 4; Relevance-IBA).

Every function is batched on the tensors' device; each ``Metric`` keeps only sums reduced by
summation, so batches and ranks can be split any way. Conventions shared by all of them:

- images (B, 3, H, W) in [0, 1]; attributions (B, H, W) at the input's resolution, any sign;
  targets (B,) class indices, or None for the model's predicted classes.
- ``tile`` is a tile side in pixels (:mod:`.tiles`); tiles are numbered in raster order.
- Ranking ties are broken by raster order (stable sorts), for tiles and for pixels.
- Undefined per-image scores are NaN and are left out of means (and of their counts).

Modules: :mod:`.degradation` (MoRF/LeRF, eq. 8), :mod:`.localisation` (boxes, masks, boundaries),
:mod:`.sensitivity` (Sensitivity-n, eq. 16), :mod:`.similarity` (SSIM, Spearman, Pearson),
:mod:`.randomisation` (cascading weight randomisation), :mod:`.aggregate` (means, results dict).
"""

from readout.metrics.aggregate import ImageMeans, results_dict
from readout.metrics.degradation import (
    Degradation,
    degradation_curves,
    degradation_score,
    scaled_degradation,
    tile_ranks,
    top1_probability,
)
from readout.metrics.localisation import (
    LOCALISATION_SCORES,
    Localisation,
    boundary_bands,
    boundary_share,
    boundary_sharpness,
    box_ratio,
    coverage,
    localisation_scores,
    mass_inside,
    top_n_ratio,
)
from readout.metrics.randomisation import (
    Randomisation,
    RandomisationCurve,
    cascading_randomisation,
    map_similarity,
    randomisation_curve,
    randomisation_labels,
    reinitialise,
)
from readout.metrics.sensitivity import (
    SensitivityN,
    correlations_from_drops,
    log_spaced_counts,
    random_tile_masks,
    sensitivity_drops,
    sensitivity_n,
    sensitivity_n_correlations,
)
from readout.metrics.similarity import normalise_map, pearson, spearman, ssim
from readout.metrics.tiles import Baseline, num_tiles, tile_sums

__all__ = [
    "LOCALISATION_SCORES",
    "Baseline",
    "Degradation",
    "ImageMeans",
    "Localisation",
    "Randomisation",
    "RandomisationCurve",
    "SensitivityN",
    "boundary_bands",
    "boundary_share",
    "boundary_sharpness",
    "box_ratio",
    "cascading_randomisation",
    "correlations_from_drops",
    "coverage",
    "degradation_curves",
    "degradation_score",
    "localisation_scores",
    "log_spaced_counts",
    "map_similarity",
    "mass_inside",
    "normalise_map",
    "num_tiles",
    "pearson",
    "random_tile_masks",
    "randomisation_curve",
    "randomisation_labels",
    "reinitialise",
    "results_dict",
    "scaled_degradation",
    "sensitivity_drops",
    "sensitivity_n",
    "sensitivity_n_correlations",
    "spearman",
    "ssim",
    "tile_ranks",
    "tile_sums",
    "top1_probability",
    "top_n_ratio",
]
