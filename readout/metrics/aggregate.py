"""Means of per-image scores over batches and ranks, and plain-Python results for reports.

Per-image scores that are undefined (an image without a mask, a box too large, a correlation with zero
variance) are NaN: they are left out of the mean and of its count, never counted as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric


class ImageMeans(Metric):
    """Column means of per-image values (B, L), NaN left out; sums, sums of squares and counts reduced
    by summation.

    ``compute`` returns ``{"mean": (L,), "se": (L,), "count": (L,)}``; subclasses name the columns.
    """

    is_differentiable = False
    full_state_update = False
    sums: torch.Tensor
    squares: torch.Tensor
    counts: torch.Tensor

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.add_state("sums", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        """values: (B, L) per-image scores, NaN where undefined."""
        if values.dim() != 2 or values.shape[1] != self.size:
            raise ValueError(f"values must be (B, {self.size}), got {tuple(values.shape)}")
        defined = ~values.isnan()
        kept = torch.where(defined, values, 0).double()
        self.sums += kept.sum(dim=0)
        self.squares += kept.square().sum(dim=0)
        self.counts += defined.sum(dim=0)

    def means(self) -> torch.Tensor:
        """(L,) float64: the mean of each column over the defined values; NaN where none was."""
        return self.sums / self.counts

    def standard_errors(self) -> torch.Tensor:
        """(L,) float64: the standard error of each mean, sample std / √count; NaN below 2 values."""
        return standard_error(self.sums, self.squares, self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"mean": self.means(), "se": self.standard_errors(), "count": self.counts}


def standard_error(sums: torch.Tensor, squares: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The standard error of a mean from the sum, the sum of squares and the count of its values:
    √(Σ(x − x̄)² / (n − 1)) / √n, NaN where n < 2."""
    variance = (squares - sums.square() / counts).clamp_min(0.0) / (counts - 1)
    return torch.where(counts >= 2, (variance / counts).sqrt(), torch.nan)


def results_dict(metrics: Mapping[str, Metric]) -> dict[str, Any]:
    """``{name: metric.compute()}`` with tensors turned into floats and lists, ready for JSON or YAML."""
    return {name: _plain(metric.compute()) for name, metric in metrics.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
