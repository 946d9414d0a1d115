"""The evaluation's configuration: what runs (methods, data, metrics) and how.

Dataclasses read by jsonargparse from ``configs/eval/*.yaml`` (:mod:`readout.evaluation.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from readout.classifier import Classifier
from readout.evaluation.context import MethodSpec
from readout.evaluation.methods import method_entry
from readout.metrics.tiles import Baseline
from readout.statistics_cache import DEFAULT_CACHE

BaselineName = Literal["mean", "zero", "normalised-zero"]
"""Replacement of removed pixels: each image's per-channel mean, black (0 in [0, 1]), or the
classifier's normalisation mean (0 of its normalised input); a float is a constant in [0, 1]."""


def resolve_baseline(baseline: BaselineName | float, classifier: Classifier) -> Baseline:
    """The metrics' :data:`readout.metrics.tiles.Baseline` for a config value."""
    if baseline == "normalised-zero":
        return classifier.mean
    return baseline


@dataclass
class ClassifierConfig:
    """The classifier explained (see :func:`readout.backbones.load_classifier`)."""

    name: str = "synthetic-cnn"
    """``synthetic-cnn``, any torchvision classification model (``resnet18``), your own as an import
    path ``package.module:callable`` (this config is your call: it is imported), or a saved
    classifier's path."""
    weights: str | None = "IMAGENET1K_V1"
    """torchvision weight entry of torchvision models (must be in the torch hub cache); null: random init."""
    weights_path: str | None = None
    """A local weights file (safetensors or a state dict) to load instead of the hub cache."""
    input_size: int | None = None
    """The classifier's input side (default: its name's; 224 for a model of your own)."""
    normalisation: dict[str, list[float]] | None = None
    """``{mean: [3], std: [3]}`` (default: its name's, else ImageNet's)."""
    classes: int | list[str] | None = None
    """Class names or their number (default: its name's, else 1000)."""
    allow_import: bool = False
    """Rebuild a saved classifier whose file names an import path (runs that code: trust the file)."""


@dataclass
class SyntheticData:
    """A held-out synthetic set that the command writes itself when ``data.shards`` holds no manifest."""

    n: int = 512
    size: int = 64
    seed: int = 4250
    """Distinct from every other seed of the project (training 0, 10, 11; statistics 777, 4243; the
    demo's and compare_relevance's held-out 4242; 4244): no image here was seen before."""
    shard_size: int = 128


@dataclass
class DataConfig:
    """The eval shards and how their images are brought to the classifier's input size."""

    shards: str
    """A shard directory, manifest, brace pattern or fsspec URL (:mod:`readout.data.shards`)."""
    resize: int | None = None
    """Shorter side after resizing (ImageNet: 256); null keeps the stored size."""
    crop: int | None = None
    """Center crop (ImageNet: 224); null keeps the image."""
    batch_size: int = 32
    num_workers: int = 0
    synthetic: SyntheticData | None = None
    """Write this synthetic set to ``shards`` when it is missing."""


@dataclass
class StatisticsConfig:
    """Where the Per-Sample Bottleneck's μ/σ come from (estimated once, cached as explain caches them)."""

    shards: str | None = None
    """Shards of the classifier's training data; null: the synthetic set (synthetic-cnn only)."""
    samples: int = 2000
    cache: str = str(DEFAULT_CACHE)
    images: list[str] | None = None
    """Image files or globs (a folder of the training images) instead of shards."""


@dataclass
class DegradationConfig:
    """MoRF/LeRF degradation (paper Sec. 4.6): 2T forward passes per image and tile size."""

    tiles: list[int] = field(default_factory=lambda: [8, 14])
    """Tile sides in px (224 px ImageNet: the paper's 8 and 14)."""
    baseline: BaselineName | float = "mean"
    """What removed tiles become (see :data:`BaselineName`); the paper: "a constant value"."""
    fraction: float = 1.0
    """Share of the images degraded (by key hash)."""


@dataclass
class LocalisationConfig:
    """Box and mask scores (paper Sec. 4.5; :mod:`readout.metrics.localisation`)."""

    max_box_coverage: float = 0.33
    boundary_width: int = 2


@dataclass
class SensitivityConfig:
    """Sensitivity-n (paper App. G.1): ``points`` values of n x ``num_masks`` forward passes per image."""

    fraction: float = 0.02
    """Share of the images (by key hash); the paper used 1000 ImageNet validation images (2%)."""
    tile: int = 8
    points: int = 16
    max_fraction: float = 0.8
    num_masks: int = 100
    baseline: BaselineName | float = "normalised-zero"
    """The paper's pixels "set to zero" (App. G.1) are zeros of the classifier's normalised input."""
    seed: int = 0


@dataclass
class RandomisationConfig:
    """Cascading weight randomisation (paper App. G.3): each method runs once per re-initialised stage."""

    fraction: float = 0.004
    """Share of the images (by key hash); the paper used 200 ImageNet validation images."""
    methods: list[str] | None = None
    """Row names to check; null: every row."""
    seed: int = 0
    window_size: int = 5


@dataclass
class EvalConfig:
    """``python -m readout.evaluate``: methods x metrics over eval shards (paper Table 2 and Fig. 6)."""

    methods: list[MethodSpec]
    """The rows: ``{name, method, options}`` with ``method`` a key of readout.evaluation.methods.METHODS."""
    data: DataConfig
    out: str = "runs/eval"
    """Output directory (results, plots and the cache of finished (method, shard) results)."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    localisation: LocalisationConfig = field(default_factory=LocalisationConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    randomisation: RandomisationConfig = field(default_factory=RandomisationConfig)
    target: Literal["label", "predicted"] = "label"
    """Class explained and scored: the label, or the classifier's top-1."""
    reference: str | None = None
    """The row every other row is compared with image by image (mean ± standard error of the
    per-image differences, in ``results.md`` and ``results.json``); null: the first row."""
    plot_images: int = 6
    """Images in ``heatmaps.png``."""
    device: str = "cpu"
    """``cpu``, ``cuda`` (under torchrun: this rank's GPU) or ``cuda:N``."""
    chunk_size: int = 256
    """Images per forward pass in degradation and Sensitivity-n."""
    threads: int | None = None
    """CPU threads for torch (null: torch's default). On a CPU shared with other jobs, 1 avoids the
    threads spinning while they wait for each other."""
    fuse: bool = True
    """Degradation and Sensitivity-n run a copy with batch norm folded (channels-last): the same logits
    up to rounding, faster (the many perturbed forward passes are most of an evaluation's time)."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: give at least one row")
        names = [spec.name for spec in self.methods]
        doubles = sorted({name for name in names if names.count(name) > 1})
        if doubles:
            raise ValueError(f"methods: row names must be unique, repeated: {doubles}")
        for spec in self.methods:
            method_entry(spec)
        for name, value in [
            ("degradation.fraction", self.degradation.fraction),
            ("sensitivity.fraction", self.sensitivity.fraction),
            ("randomisation.fraction", self.randomisation.fraction),
        ]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not self.degradation.tiles or min(self.degradation.tiles) < 1:
            raise ValueError(
                f"degradation.tiles must be positive tile sides in px, got {self.degradation.tiles}"
            )
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference: no row is named {self.reference!r}; the rows: {names}")
        unknown = sorted(set(self.randomisation.methods or []) - set(names))
        if unknown:
            raise ValueError(f"randomisation.methods names rows that do not exist: {unknown}")
        if self.target not in ("label", "predicted"):
            raise ValueError(f"target must be 'label' or 'predicted', got {self.target!r}")
        if self.chunk_size < 1 or self.data.batch_size < 1 or self.plot_images < 0:
            raise ValueError("chunk_size and data.batch_size must be >= 1 and plot_images >= 0")
