"""The metric states of one row: summed over batches, shards and ranks, cached per shard as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torchmetrics import Metric

from readout.atomic import atomic_write
from readout.evaluation.config import EvalConfig
from readout.metrics import (
    LOCALISATION_SCORES,
    Degradation,
    Localisation,
    Randomisation,
    SensitivityN,
    log_spaced_counts,
    num_tiles,
)
from readout.metrics.paired import ImageScores

#: Bump when the meaning of cached states changes: older cache files are then ignored.
CACHE_VERSION = 3  # 3: per-image scores for paired differences
#: The prefix of the per-image states of a row (not reported as rows' scores).
PER_IMAGE = "images/"


class RowMetrics:
    """The metric states of one row, by name: ``localisation``, ``degradation-<tile>``,
    ``sensitivity`` and ``randomisation`` (the last two only when configured)."""

    def __init__(self, config: EvalConfig, size: tuple[int, int], labels: list[str] | None) -> None:
        height, width = size
        self.metrics: dict[str, Metric] = {
            "localisation": Localisation(
                config.localisation.max_box_coverage, config.localisation.boundary_width
            )
        }
        for tile in config.degradation.tiles:
            self.metrics[f"degradation-{tile}"] = Degradation(num_tiles(height, width, tile))
        # Per-image scores by image key, for the paired differences between rows.
        self.metrics[f"{PER_IMAGE}localisation"] = ImageScores(len(LOCALISATION_SCORES))
        for tile in config.degradation.tiles:
            self.metrics[f"{PER_IMAGE}degradation-{tile}"] = ImageScores(1)
        if config.sensitivity.fraction > 0:
            total = num_tiles(height, width, config.sensitivity.tile)
            ns = log_spaced_counts(total, config.sensitivity.points, config.sensitivity.max_fraction)
            self.metrics["sensitivity"] = SensitivityN(ns)
        if labels is not None:
            self.metrics["randomisation"] = Randomisation(labels)
        self.seconds = 0.0
        self.metric_seconds = 0.0
        self.images = 0
        self.examples: torch.Tensor | None = None

    def to(self, device: torch.device) -> RowMetrics:
        self.metrics = {name: metric.to(device) for name, metric in self.metrics.items()}
        return self

    def states(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"{name}/{state}": _state_tensor(metric, state).detach().cpu().contiguous()
            for name, metric in self.metrics.items()
            for state in metric._defaults
        }
        if self.examples is not None:
            tensors["examples"] = self.examples.detach().cpu().float().contiguous()
        return tensors

    def save(self, path: Path) -> None:
        """Writes the states atomically (:func:`readout.atomic.atomic_write`)."""
        meta = {
            "seconds": repr(self.seconds),
            "metric_seconds": repr(self.metric_seconds),
            "images": str(self.images),
            "version": str(CACHE_VERSION),
        }
        atomic_write(str(path), save(self.states(), metadata=meta))

    def add_file(self, path: Path) -> None:
        """Adds the states of a cache file to these (states are sums)."""
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            for name, metric in self.metrics.items():
                states = {
                    state: handle.get_tensor(f"{name}/{state}").to(metric.device)
                    for state in metric._defaults
                }
                # A list state (per-image scores) merges a list: the file's rows after this one's.
                metric.merge_state(
                    {
                        state: [value] if isinstance(getattr(metric, state), list) else value
                        for state, value in states.items()
                    }
                )
            if "examples" in handle.keys() and self.examples is None:
                self.examples = handle.get_tensor("examples")
        self.seconds += float(meta.get("seconds", 0.0))
        self.metric_seconds += float(meta.get("metric_seconds", 0.0))
        self.images += int(meta.get("images", 0))

    def merge(self, other: RowMetrics) -> None:
        for name, metric in self.metrics.items():
            metric.merge_state(other.metrics[name])
        self.seconds += other.seconds
        self.metric_seconds += other.metric_seconds
        self.images += other.images
        if self.examples is None:
            self.examples = other.examples


def _state_tensor(metric: Metric, state: str) -> torch.Tensor:
    """A metric state as one tensor (per-image scores concatenated over the batches)."""
    return metric.state_tensor(state) if isinstance(metric, ImageScores) else getattr(metric, state)
