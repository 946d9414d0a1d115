"""``python -m readout.evaluate --config configs/eval/synthetic.yaml``: attribution methods x metrics.

Every row of ``methods`` (a name, a :data:`readout.methods.METHODS` key and its options) is run over
the eval shards and scored as in the IBA paper (Schulz et al. 2020, Sec. 4; :mod:`readout.metrics`):

- degradation (Sec. 4.6, eq. 8): the area between the scaled LeRF and MoRF curves, per tile size
  (``degradation.tiles``, tile sides in px; the paper's 8 and 14 px on 224 px images);
- localisation: the bounding-box top-n ratio (Sec. 4.5, boxes under 33% of the image) and, where the
  data set has object masks, the mask top-n ratio, positive mass inside the mask and the boundary
  scores (Relevance-IBA);
- Sensitivity-n (Sec. 4.4, App. G.1) on a subset of the images (``sensitivity.fraction``);
- cascading weight randomisation (Sec. 4.3, App. G.3), SSIM to the original map, on a subset.

Subsets are chosen by a hash of each sample's key, so they do not depend on batches, shards or ranks.

Outputs in ``out``: ``results.json`` (every number, the config, timings), ``results.md`` (the paper's
Table 2 layout: rows are methods), ``degradation.png`` (mean scaled MoRF/LeRF curves),
``sensitivity-n.png``, ``randomisation.png`` and ``heatmaps.png`` (every method on a few images).

Resuming: the metric states of each (method, shard, rank) are written to ``out/cache`` when that shard is
done (temporary file, then rename); a rerun loads them instead of recomputing. The cache key holds the
row, the classifier's weights, the readout bundle's files and every setting that changes the numbers.

Distributed: under ``torchrun`` (or with a process group initialised) every rank reads every shard and
keeps every ``world_size``-th sample (the eval loader's rank split), and the metric states are summed
over ranks before the scores are computed; rank 0 writes the outputs. The synthetic data set is written
by the command itself when ``data.synthetic`` is set and its shards are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchmetrics import Metric
from tqdm.auto import tqdm

from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.data.shards import ShardList, make_loader, resolve_shards
from readout.data.transforms import eval_transform
from readout.export import classifier_fingerprint
from readout.logs import show_info
from readout.methods import (
    Attributor,
    MethodContext,
    MethodSpec,
    build_method,
    bundle_digest,
    method_entry,
    options_of,
)
from readout.metrics import (
    LOCALISATION_SCORES,
    Degradation,
    Localisation,
    Randomisation,
    SensitivityN,
    correlations_from_drops,
    degradation_curves,
    localisation_scores,
    log_spaced_counts,
    num_tiles,
    randomisation_curve,
    randomisation_labels,
    results_dict,
    sensitivity_drops,
    top1_probability,
)
from readout.metrics.chunks import logits_of
from readout.metrics.degradation import image_areas
from readout.metrics.paired import ImageScores, key_hashes, paired_differences
from readout.metrics.randomisation import cascading_randomisation
from readout.metrics.tiles import Baseline
from readout.split import folded_copy
from readout.statistics_cache import DEFAULT_CACHE

#: Bump when the meaning of cached states changes: older cache files are then ignored.
CACHE_VERSION = 3  # 3: per-image scores for paired differences
#: The prefix of the per-image states of a row (not reported as rows' scores).
PER_IMAGE = "images/"


# ---------------------------------------------------------------------------------------------------------
# Configuration


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
    """The rows: ``{name, method, options}`` with ``method`` a key of readout.methods.METHODS."""
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
    """Degradation and Sensitivity-n run a copy with batch norm folded (channels-last): same logits up
    to rounding, about 1.5x faster on CPU."""

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


# ---------------------------------------------------------------------------------------------------------
# Pieces of the run


def in_subset(key: str, fraction: float, salt: str) -> bool:
    """Whether sample ``key`` belongs to the ``fraction`` of the data chosen by ``salt`` (by hash)."""
    if fraction >= 1.0:
        return True
    value = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "little")
    return value / 2**64 < fraction


def inference_model(classifier: Classifier, fuse: bool) -> nn.Module:
    """The classifier for forward-only metrics: a batch-norm-folded channels-last copy, or itself."""
    return folded_copy(classifier, classifier.name) if fuse else classifier


def ensure_synthetic(config: DataConfig) -> None:
    """Writes ``config.synthetic`` to ``config.shards`` unless its manifest is there (and matches)."""
    from readout.data.format import MANIFEST_NAME, Manifest
    from readout.data.synthetic import write_shards

    spec = config.synthetic
    if spec is None:
        return
    manifest = Path(config.shards) / MANIFEST_NAME
    wanted = {"n": spec.n, "size": spec.size, "seed": spec.seed}
    if manifest.is_file():
        source = Manifest.read(str(manifest)).source
        if {k: source.get(k) for k in wanted} != wanted:
            raise ValueError(
                f"{manifest} holds a synthetic set {source}, not the configured {wanted}: "
                "remove it or point data.shards elsewhere"
            )
        return
    print(f"writing {spec.n} held-out synthetic images (seed {spec.seed}, {spec.size} px) to {config.shards}")
    write_shards(config.shards, spec.n, spec.size, spec.seed, spec.shard_size)


def slug(name: str) -> str:
    """A file-name-safe form of a row name."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", name).strip("-") or "row"


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
        """Writes the states atomically: a temporary file, then a rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".tmp{os.getpid()}")
        meta = {
            "seconds": repr(self.seconds),
            "metric_seconds": repr(self.metric_seconds),
            "images": str(self.images),
            "version": str(CACHE_VERSION),
        }
        save_file(self.states(), str(temporary), metadata=meta)
        os.replace(temporary, path)

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


@dataclass(eq=False)
class Row:
    """One method of the evaluation: its spec, cache key and (built on first use) attributor."""

    spec: MethodSpec
    key: str
    signed: bool
    randomised: bool
    attributor: Attributor | None = None

    @property
    def directory(self) -> str:
        return f"{slug(self.spec.name)}-{self.key}"


@dataclass
class Batch:
    """One batch and what every row's metrics share: targets, subsets, top-1 and Sensitivity-n drops."""

    images: torch.Tensor
    targets: torch.Tensor
    data: dict[str, Any]
    degrade: torch.Tensor
    sensitivity: torch.Tensor
    randomise: torch.Tensor
    top1: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    drops: torch.Tensor | None = None


class Evaluation:
    """Runs the rows over the shards on one rank; :meth:`run` returns un-reduced metrics per row."""

    def __init__(self, config: EvalConfig, rank: int = 0, world_size: int = 1, progress: bool = True) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.progress = progress
        self.device = torch.device(config.device)
        self.out = Path(config.out)
        spec = config.classifier
        self.classifier = load_classifier(
            spec.name,
            weights=spec.weights,
            weights_path=spec.weights_path,
            input_size=spec.input_size,
            normalisation=spec.normalisation,
            classes=spec.classes,
            allow_import=spec.allow_import,
        )
        self.classifier.to(self.device)
        self.fingerprint = classifier_fingerprint(self.classifier)
        self.context = MethodContext(
            config.statistics.shards,
            config.statistics.samples,
            config.statistics.cache,
            config.statistics.images,
        )
        self.shards: ShardList = resolve_shards(config.data.shards)
        self.transform = eval_transform(config.data.resize, config.data.crop)
        self.labels = randomisation_labels(self.classifier) if config.randomisation.fraction > 0 else None
        chosen = config.randomisation.methods
        self.rows = [
            Row(
                spec,
                self._row_key(spec),
                method_entry(spec).signed,
                self.labels is not None and (chosen is None or spec.name in chosen),
            )
            for spec in config.methods
        ]
        self._forward_model: nn.Module | None = None
        self._size: tuple[int, int] | None = None
        self.calls: dict[str, int] = {row.spec.name: 0 for row in self.rows}

    # --- keys and files ---------------------------------------------------------------------------------

    def _row_key(self, spec: MethodSpec) -> str:
        config = self.config
        settings = {
            "version": CACHE_VERSION,
            "method": spec.method,
            "options": dict(sorted(options_of(spec).items())),
            "bundle": bundle_digest(spec),
            "classifier": self.fingerprint,
            "data": [config.data.resize, config.data.crop],
            "statistics": [config.statistics.shards, config.statistics.samples],
            "target": config.target,
            "degradation": asdict(config.degradation),
            "localisation": asdict(config.localisation),
            "sensitivity": asdict(config.sensitivity),
            "randomisation": {k: v for k, v in asdict(config.randomisation).items() if k != "methods"},
            "randomised": config.randomisation.methods is None or spec.name in config.randomisation.methods,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def cache_file(self, row: Row, shard: str) -> Path:
        name = Path(shard).name.removesuffix(".tar")
        return self.out / "cache" / row.directory / f"{name}.rank{self.rank}of{self.world_size}.safetensors"

    # --- building ---------------------------------------------------------------------------------------

    def attributor(self, row: Row) -> Attributor:
        if row.attributor is None:
            row.attributor = build_method(row.spec, self.classifier, self.context)
        return row.attributor

    def forward_model(self) -> nn.Module:
        if self._forward_model is None:
            self._forward_model = inference_model(self.classifier, self.config.fuse)
        return self._forward_model

    def prepare(self) -> None:
        """Builds, on every rank at the same time, the rows whose building may talk to the other ranks
        (Per-Sample μ/σ estimation sums over ranks), for the classifier and each randomisation step."""
        needy = [row for row in self.rows if row.spec.method in ("per-sample", "relevance-per-sample")]
        for row in needy:
            self.attributor(row)
        randomised = [row for row in needy if row.randomised]
        if randomised:
            unshared = self.context.unshared()
            for _, model in cascading_randomisation(self.classifier, self.config.randomisation.seed):
                for row in randomised:
                    build_method(row.spec, cast(Classifier, model), unshared)

    def fresh_metrics(self, row: Row) -> RowMetrics:
        assert self._size is not None
        return RowMetrics(self.config, self._size, self.labels if row.randomised else None).to(self.device)

    # --- the loop ---------------------------------------------------------------------------------------

    def loader(self, shard: str):
        return make_loader(
            [shard],
            "eval",
            self.config.data.batch_size,
            self.config.data.num_workers,
            transform=self.transform,
            rank=self.rank,
            world_size=self.world_size,
            persistent_workers=False,
        )

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the eval images after the transform (read from the first sample)."""
        if self._size is None:
            for batch in self.loader(self.shards.urls[0]):
                self._size = (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
                break
            else:
                size = self.classifier.input_size
                self._size = (size, size)
        return self._size

    def run(self) -> dict[str, RowMetrics]:
        """Every row's metrics over this rank's share of the data (not yet reduced over ranks)."""
        self.image_size()
        pending = {
            shard: [row for row in self.rows if not self.cache_file(row, shard).is_file()]
            for shard in self.shards.urls
        }
        if _any_rank(any(pending.values()), self.device):
            self.prepare()
        totals = {row.spec.name: self.fresh_metrics(row) for row in self.rows}
        work = sum(len(rows) for rows in pending.values())
        bar = tqdm(
            total=self._expected_images() * work // max(len(self.shards.urls), 1),
            desc="evaluating",
            unit="img",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        for index, (shard, rows) in enumerate(pending.items()):
            done = self.evaluate_shard(shard, rows, keep_examples=index == 0, bar=bar) if rows else {}
            for row in self.rows:
                if row in rows:
                    done[row.spec.name].save(self.cache_file(row, shard))
                    totals[row.spec.name].merge(done[row.spec.name])
                else:
                    totals[row.spec.name].add_file(self.cache_file(row, shard))
        bar.close()
        return totals

    def _expected_images(self) -> int:
        """Images this rank reads over all shards (from the manifest; an estimate without one)."""
        samples = self.shards.samples
        if samples is None:
            return 0
        return sum(math.ceil(count / self.world_size) for count in samples)

    def evaluate_shard(
        self, shard: str, rows: Sequence[Row], keep_examples: bool, bar: Any = None
    ) -> dict[str, RowMetrics]:
        metrics = {row.spec.name: self.fresh_metrics(row) for row in rows}
        for number, data in enumerate(self.loader(shard)):
            batch = self.prepare_batch(data)
            for row in rows:
                if bar is not None:
                    bar.set_postfix_str(f"{row.spec.name} | {Path(shard).name}", refresh=False)
                self.evaluate_batch(row, batch, metrics[row.spec.name], keep_examples and number == 0)
                if bar is not None:
                    bar.update(len(batch.images))
        return metrics

    def prepare_batch(self, data: dict[str, Any]) -> Batch:
        images = data["image"].to(self.device)
        if self.config.target == "label":
            targets = data["label"].to(self.device)
        else:
            targets = logits_of(self.classifier, images, self.config.chunk_size).argmax(dim=1)
        keys = data["key"]

        def subset(fraction: float, salt: str) -> torch.Tensor:
            chosen = [in_subset(key, fraction, salt) for key in keys]
            return torch.tensor(chosen, dtype=torch.bool, device=self.device)

        batch = Batch(
            images,
            targets,
            data,
            degrade=subset(self.config.degradation.fraction, "degradation"),
            sensitivity=subset(self.config.sensitivity.fraction, "sensitivity"),
            randomise=subset(self.config.randomisation.fraction, "randomisation"),
        )
        model = self.forward_model()
        if batch.degrade.any():
            batch.top1 = top1_probability(model, images[batch.degrade], self.config.chunk_size)
        if self.config.sensitivity.fraction > 0 and batch.sensitivity.any():
            conf = self.config.sensitivity
            assert self._size is not None
            ns = log_spaced_counts(num_tiles(*self._size, conf.tile), conf.points, conf.max_fraction)
            batch.masks, batch.drops = sensitivity_drops(
                model,
                images[batch.sensitivity],
                targets[batch.sensitivity],
                conf.tile,
                ns,
                conf.num_masks,
                conf.seed,
                resolve_baseline(conf.baseline, self.classifier),
                self.config.chunk_size,
            )
        return batch

    def evaluate_batch(self, row: Row, batch: Batch, metrics: RowMetrics, keep_examples: bool) -> None:
        attributor = self.attributor(row)
        began = time.perf_counter()
        maps = attributor(batch.images, batch.targets).detach().float()
        attributed = time.perf_counter()
        metrics.seconds += attributed - began
        self.score(row, batch, maps, metrics, keep_examples)
        metrics.metric_seconds += time.perf_counter() - attributed

    def score(
        self, row: Row, batch: Batch, maps: torch.Tensor, metrics: RowMetrics, keep_examples: bool
    ) -> None:
        """Adds one batch of one row's maps to its metrics."""
        metrics.images += len(batch.images)
        self.calls[row.spec.name] += 1
        expected = (len(batch.images), *batch.images.shape[-2:])
        if tuple(maps.shape) != expected:
            raise ValueError(f"row {row.spec.name!r} gave maps {tuple(maps.shape)}, expected {expected}")
        if keep_examples and self.config.plot_images:
            metrics.examples = maps[: self.config.plot_images].cpu()
        data, device = batch.data, self.device
        regions = (data["box_mask"].to(device), data["mask"].to(device), data["has_mask"].to(device))
        metrics.metrics["localisation"].update(maps, *regions)
        keys = key_hashes(list(data["key"]), device)
        loc = self.config.localisation
        scores = localisation_scores(maps, *regions, loc.max_box_coverage, loc.boundary_width)
        per_image = torch.stack([scores[name] for name in LOCALISATION_SCORES], dim=1)
        metrics.metrics[f"{PER_IMAGE}localisation"].update(keys, per_image)
        model, chunk = self.forward_model(), self.config.chunk_size
        if batch.top1 is not None:
            chosen = batch.degrade
            for tile in self.config.degradation.tiles:
                morf, lerf = degradation_curves(
                    model,
                    batch.images[chosen],
                    maps[chosen],
                    batch.targets[chosen],
                    tile,
                    resolve_baseline(self.config.degradation.baseline, self.classifier),
                    chunk,
                )
                metrics.metrics[f"degradation-{tile}"].update(morf, lerf, batch.top1)
                areas = image_areas(morf, lerf)[:, None]
                metrics.metrics[f"{PER_IMAGE}degradation-{tile}"].update(keys[chosen], areas)
        if batch.drops is not None and batch.masks is not None:
            correlations = correlations_from_drops(
                maps[batch.sensitivity], self.config.sensitivity.tile, batch.masks, batch.drops
            )
            metrics.metrics["sensitivity"].update(correlations)
        if row.randomised and batch.randomise.any():
            unshared = self.context.unshared()
            conf = self.config.randomisation
            curve = randomisation_curve(
                self.classifier,
                batch.images[batch.randomise],
                lambda model: build_method(row.spec, cast(Classifier, model), unshared),
                batch.targets[batch.randomise],
                conf.seed,
                conf.window_size,
                sign_invariant=row.signed,
                chunk_size=chunk,
            )
            metrics.metrics["randomisation"].update(curve)

    def example_images(self) -> tuple[torch.Tensor, list[str]]:
        """The images whose maps ``heatmaps.png`` shows: the first of this rank's first batch."""
        for batch in self.loader(self.shards.urls[0]):
            count = self.config.plot_images
            return batch["image"][:count], list(batch["key"][:count])
        return torch.empty(0), []


# ---------------------------------------------------------------------------------------------------------
# Results


def compute_results(evaluation: Evaluation, totals: dict[str, RowMetrics]) -> dict[str, Any]:
    """Scores per row; reduces the states over ranks first when a process group runs (collective)."""
    rows: dict[str, Any] = {}
    for row in evaluation.rows:
        state = totals[row.spec.name]
        with warnings.catch_warnings():
            # states merged from cache files count no update() calls: not a mistake here
            warnings.filterwarnings(
                "ignore", message=".*compute.*called before.*update", category=UserWarning
            )
            values = results_dict(
                {name: metric for name, metric in state.metrics.items() if not name.startswith(PER_IMAGE)}
            )
        seconds = torch.tensor(
            [state.seconds, state.metric_seconds, float(state.images)],
            dtype=torch.float64,
            device=evaluation.device,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(seconds)
        total_seconds, metric_seconds, images = seconds.tolist()
        rows[row.spec.name] = {
            "method": row.spec.method,
            "options": dict(options_of(row.spec)),
            "signed": row.signed,
            "seconds_per_image": total_seconds / images if images else float("nan"),
            "metric_seconds": metric_seconds,
            "images": int(images),
            **values,
        }
    add_paired_differences(evaluation, totals, rows)
    return rows


#: The scores compared image by image: the per-image column of each, and the result it refines.
PAIRED_LOCALISATION = ("box_ratio", "mask_ratio", "mask_mass", "boundary_sharpness")


def add_paired_differences(
    evaluation: Evaluation, totals: dict[str, RowMetrics], rows: dict[str, Any]
) -> None:
    """Adds ``paired`` to every row but the reference: per score, the mean ± standard error of the
    per-image differences to the reference row on the images both scored (collective where
    distributed). Degradation differences are in units of the score (divided by the reference's
    t1 − b, the same for every row on the same images)."""
    config = evaluation.config
    reference = config.reference or config.methods[0].name
    per_image = {
        name: {
            key[len(PER_IMAGE) :]: metric.compute()
            for key, metric in state.metrics.items()
            if key.startswith(PER_IMAGE)
        }
        for name, state in totals.items()
    }
    columns = {name: LOCALISATION_SCORES.index(name) for name in PAIRED_LOCALISATION}
    for name, result in rows.items():
        if name == reference:
            result["paired"] = {"reference": reference}
            continue
        paired: dict[str, Any] = {"reference": reference}
        local = paired_differences(per_image[name]["localisation"], per_image[reference]["localisation"])
        for score, column in columns.items():
            paired[score] = {part: float(local[part][column]) for part in ("mean", "se", "count")}
        for tile in config.degradation.tiles:
            group = f"degradation-{tile}"
            scale = rows[reference][group]["t1"] - rows[reference][group]["b"]
            areas = paired_differences(per_image[name][group], per_image[reference][group])
            paired[group] = {
                "mean": float(areas["mean"][0]) / scale,
                "se": abs(float(areas["se"][0]) / scale),
                "count": float(areas["count"][0]),
            }
        result["paired"] = paired


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _with_error(value: Any, error: Any) -> str:
    """``0.818 ± 0.012``, or the value alone where the error is undefined."""
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return _fmt(value)
    return f"{_fmt(value)} ± {_fmt(error)}"


def markdown_table(config: EvalConfig, rows: dict[str, Any], size: tuple[int, int]) -> str:
    """The paper's Table 2 layout: one row per method; degradation per tile size, boxes, masks."""
    tiles = config.degradation.tiles
    header = ["Method", *[f"deg. {t}x{t} px" for t in tiles], "bbox", "mask top-n", "mask mass", "boundary"]
    header += ["Sens.-n (mean r)", "SSIM rand. (last)", "s / img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in rows.items():
        loc = result["localisation"]
        cells = [name]
        cells += [
            _with_error(result[f"degradation-{t}"]["score"], result[f"degradation-{t}"]["score_se"])
            for t in tiles
        ]
        cells += [
            _with_error(loc["box_ratio"], loc["box_ratio_se"]),
            _fmt(loc["mask_ratio"]),
            _fmt(loc["mask_mass"]),
        ]
        cells += [_fmt(loc["boundary_sharpness"])]
        sens = result.get("sensitivity")
        correlations = [c for c in (sens or {}).get("correlation", []) if not math.isnan(c)]
        cells.append(_fmt(sum(correlations) / len(correlations)) if correlations else "–")
        rand = result.get("randomisation")
        cells.append(_fmt(rand["ssim"][-1]) if rand else "–")
        cells.append(_fmt(result["seconds_per_image"], 4))
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    counts = [f"{first[f'degradation-{t}']['count']:.0f}" for t in tiles]
    sens_n = int(max((first.get("sensitivity") or {}).get("count", [0]) or [0]))
    rand_n = max(
        (int(max(r["randomisation"]["count"])) for r in rows.values() if r.get("randomisation")), default=0
    )
    height, width = size
    notes = [
        "",
        f"Images: {first['images']} ({height}x{width} px); target: {config.target}. ± is the standard "
        "error over images (for degradation with t1 and b fixed). "
        f"Degradation (area between scaled LeRF and MoRF, eq. 8): tiles of {', '.join(map(str, tiles))} px "
        f"({', '.join(str(num_tiles(height, width, t)) for t in tiles)} tiles), "
        f"baseline {config.degradation.baseline}, on {', '.join(counts)} images. "
        f"bbox: top-n ratio on the {first['localisation']['box_ratio_count']:.0f} images whose box covers "
        f"< {config.localisation.max_box_coverage:.0%}; mask top-n / mass / boundary sharpness "
        f"({config.localisation.boundary_width} px bands) on {first['localisation']['mask_ratio_count']:.0f} "
        "images with masks.",
        f"Sensitivity-n: mean Pearson r over n, {config.sensitivity.tile} px tiles, "
        f"{config.sensitivity.num_masks} masks per n, baseline {config.sensitivity.baseline}, "
        f"{sens_n} images. Randomisation: SSIM of the map after "
        f"re-initialising every layer to the original, {rand_n} images. s / img: attribution time only.",
    ]
    return "\n".join(lines + notes + paired_table(config, rows)) + "\n"


def _signed(part: dict[str, float]) -> str:
    """``+0.012 ± 0.004``: a paired difference and its standard error."""
    mean, error = part["mean"], part["se"]
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:+.3f}" + ("" if error is None or math.isnan(error) else f" ± {error:.3f}")


def paired_table(config: EvalConfig, rows: dict[str, Any]) -> list[str]:
    """The lines of the paired-differences table (every row against the reference), or none."""
    reference = config.reference or config.methods[0].name
    others = {name: r["paired"] for name, r in rows.items() if name != reference and "paired" in r}
    if not others:
        return []
    tiles = config.degradation.tiles
    header = ["Method", *[f"deg. {t}x{t} px" for t in tiles], "bbox", "mask top-n", "mask mass", "boundary"]
    lines = [
        "",
        f"Paired differences to **{reference}**: the mean ± standard error of the per-image "
        "differences (this row minus the reference) on the images both scored; a difference is "
        "resolved where it exceeds about twice its error.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, paired in others.items():
        cells = [name, *[_signed(paired[f"degradation-{t}"]) for t in tiles]]
        cells += [_signed(paired[score]) for score in PAIRED_LOCALISATION]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(temporary, path)


def save_plots(
    out: Path,
    config: EvalConfig,
    rows: dict[str, Any],
    evaluation: Evaluation,
    totals: dict[str, RowMetrics],
) -> list[str]:
    """Writes the PNGs; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from readout.plotting import overlay

    colours = plt.get_cmap("tab20")
    written = []
    tiles = config.degradation.tiles
    figure, axes = plt.subplots(1, len(tiles), figsize=(6 * len(tiles), 4.5), squeeze=False)
    for axis, tile in zip(axes[0], tiles, strict=True):
        for i, (name, result) in enumerate(rows.items()):
            curves = result[f"degradation-{tile}"]
            axis.plot(curves["fraction"], curves["morf"], color=colours(i % 20), label=name)
            axis.plot(curves["fraction"], curves["lerf"], color=colours(i % 20), linestyle="--")
        axis.set(
            title=f"degradation, {tile} px tiles (solid MoRF, dashed LeRF)",
            xlabel="fraction of tiles removed",
        )
        axis.set_ylabel("scaled target probability (eq. 8)")
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(out / "degradation.png", dpi=110)
    plt.close(figure)
    written.append("degradation.png")

    if config.sensitivity.fraction > 0:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for i, (name, result) in enumerate(rows.items()):
            sens = result["sensitivity"]
            pixels = [n * config.sensitivity.tile**2 for n in sens["n"]]
            axis.plot(pixels, sens["correlation"], marker=".", color=colours(i % 20), label=name)
        axis.set(
            xscale="log", xlabel="pixels removed (n tiles x tile area)", ylabel="Sensitivity-n (Pearson r)"
        )
        axis.set_title(f"Sensitivity-n, {config.sensitivity.tile} px tiles")
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        figure.savefig(out / "sensitivity-n.png", dpi=110)
        plt.close(figure)
        written.append("sensitivity-n.png")

    if evaluation.labels is not None and any(r.get("randomisation") for r in rows.values()):
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for i, (name, result) in enumerate(rows.items()):
            if result.get("randomisation"):
                axis.plot(
                    evaluation.labels,
                    result["randomisation"]["ssim"],
                    marker=".",
                    color=colours(i % 20),
                    label=name,
                )
        axis.set(xlabel="re-initialised down to", ylabel="SSIM to the original map", ylim=(-0.1, 1.05))
        axis.set_title("cascading weight randomisation")
        axis.tick_params(axis="x", rotation=45)
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        figure.savefig(out / "randomisation.png", dpi=110)
        plt.close(figure)
        written.append("randomisation.png")

    images, keys = evaluation.example_images()
    shown = [(name, maps) for name in rows if (maps := totals[name].examples) is not None]
    if len(images) and shown:
        count = min(len(images), *(len(maps) for _, maps in shown))
        figure, axes = plt.subplots(
            len(shown) + 1, count, figsize=(1.6 * count + 1.5, 1.6 * (len(shown) + 1)), squeeze=False
        )
        for j in range(count):
            axes[0, j].imshow(images[j].permute(1, 2, 0).numpy())
            axes[0, j].set_title(keys[j], fontsize=5)
        for i, (name, maps) in enumerate(shown, start=1):
            signed = rows[name]["signed"]
            for j in range(count):
                axes[i, j].imshow(overlay(images[j], maps[j], symmetric=signed).permute(1, 2, 0).numpy())
            axes[i, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        figure.savefig(out / "heatmaps.png", dpi=110)
        plt.close(figure)
        written.append("heatmaps.png")
    return written


# ---------------------------------------------------------------------------------------------------------
# Entry points


def _distributed(config: EvalConfig) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) from torchrun's environment."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (collective when a process group runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Runs the evaluation (on every rank when distributed) and writes the outputs on rank 0."""
    began = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rank, world_size, started = _distributed(config)
    if config.device == "cuda" and world_size > 1:
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if rank == 0:
        ensure_synthetic(config.data)
    _barrier()
    try:
        evaluation = Evaluation(config, rank, world_size)
        totals = evaluation.run()
        rows = compute_results(evaluation, totals)
        results = {
            "rows": rows,
            "image_size": list(evaluation.image_size()),
            "world_size": world_size,
            "runtime_s": time.perf_counter() - began,
            "config": asdict(config),
        }
        if rank == 0:
            out = Path(config.out)
            out.mkdir(parents=True, exist_ok=True)
            results["plots"] = save_plots(out, config, rows, evaluation, totals)
            results["runtime_s"] = time.perf_counter() - began
            write_json(out / "results.json", results)
            (out / "results.md").write_text(markdown_table(config, rows, evaluation.image_size()))
        _barrier()
        return results
    finally:
        torch.set_num_threads(threads)
        if started:
            torch.distributed.destroy_process_group()


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """The config from ``--config FILE`` and overrides (``--degradation.tiles '[8, 16]'``), validated."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m readout.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these arguments")
    parser.add_class_arguments(EvalConfig, nested_key=None, as_positional=False)
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    return EvalConfig(**vars(parser.instantiate(namespace)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    show_info()
    config = parse_config(argv)
    results = evaluate(config)
    if results.get("plots") is not None:
        print((Path(config.out) / "results.md").read_text())
        print(f"wrote {config.out}/results.json in {results['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
