"""Per-image scores kept by image, so that two methods scored on the same images compare image by image.

The rows of an evaluation score the same images, so the difference of two rows' means has the
standard error of the per-image differences, √(var(a − b) / n), usually far below the two rows' own
standard errors combined: the images' shared difficulty cancels. :class:`ImageScores` keeps each
image's scores under a 64-bit hash of its key (reduced over ranks by concatenation);
:func:`paired_differences` aligns two of them by key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def key_hashes(keys: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """(B,) int64: a stable 64-bit hash of each sample key (the same in every process and run)."""
    hashes = [
        int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)
        for key in keys
    ]
    return torch.tensor(hashes, dtype=torch.int64, device=device)


class ImageScores(Metric):
    """The scores (B, L) of each image, by the hash of its key; NaN where a score does not apply.

    ``update(keys, values)`` with ``keys`` from :func:`key_hashes`; ``compute`` returns
    ``{"keys": (N,), "values": (N, L)}`` over all batches and ranks.
    """

    is_differentiable = False
    full_state_update = False
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if values.dim() != 2 or values.shape != (len(keys), self.size):
            raise ValueError(f"values must be ({len(keys)}, {self.size}), got {tuple(values.shape)}")
        self.keys.append(keys.to(torch.int64))
        self.values.append(values.detach().double())

    def state_tensor(self, state: str) -> torch.Tensor:
        """The state ``keys`` (N,) or ``values`` (N, L), as one tensor (a list of batches before a
        sync over ranks, one tensor after it)."""
        value = getattr(self, state)
        if isinstance(value, list) and not value:
            shape = (0,) if state == "keys" else (0, self.size)
            dtype = torch.int64 if state == "keys" else torch.float64
            return torch.zeros(shape, dtype=dtype, device=self.device)
        joined = dim_zero_cat(value)
        return joined if state == "keys" else joined.reshape(-1, self.size)

    def compute(self) -> dict[str, torch.Tensor]:
        # After a sync over ranks the lists hold the gathered tensors (or one concatenated tensor).
        return {"keys": self.state_tensor("keys"), "values": self.state_tensor("values")}


def paired_differences(
    row: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean and standard error of the per-image differences ``row − reference``, per column.

    ``row`` and ``reference`` are :meth:`ImageScores.compute` outputs; images are matched by key and
    only those with both scores defined count. Returns ``{"mean", "se", "count"}``, (L,) each; the
    mean is NaN without images and the standard error below two.
    """
    position = {int(key): index for index, key in enumerate(reference["keys"].tolist())}
    pairs = [(i, position[int(key)]) for i, key in enumerate(row["keys"].tolist()) if int(key) in position]
    size = reference["values"].shape[1]
    if not pairs:
        nan = torch.full((size,), float("nan"), dtype=torch.float64)
        return {"mean": nan, "se": nan.clone(), "count": torch.zeros(size, dtype=torch.float64)}
    mine, theirs = (torch.tensor(index) for index in zip(*pairs, strict=True))
    return difference_statistics(row["values"].cpu()[mine] - reference["values"].cpu()[theirs])


def difference_statistics(differences: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per column of (N, L) per-image differences, NaNs left out: ``{"mean", "se", "count"}``, (L,)
    each; the mean is NaN without values and the standard error below two."""
    differences = differences.double()
    defined = ~differences.isnan()
    counts = defined.sum(0).double()
    kept = torch.where(defined, differences, 0.0)
    means = kept.sum(0) / counts
    variance = (torch.where(defined, differences - means, 0.0).square().sum(0) / (counts - 1)).clamp_min(0)
    errors = torch.where(counts >= 2, (variance / counts).sqrt(), torch.nan)
    return {"mean": means, "se": errors, "count": counts}
