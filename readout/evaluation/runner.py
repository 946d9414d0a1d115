"""The run: rows of methods over the eval shards, scored batch by batch, cached per (row, shard, rank)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from readout.backbones import load_classifier
from readout.bundle import classifier_fingerprint
from readout.classifier import Classifier
from readout.data.shards import ShardList, make_loader, resolve_shards
from readout.data.transforms import eval_transform
from readout.evaluation.config import DataConfig, EvalConfig, resolve_baseline
from readout.evaluation.context import Attributor, MethodContext, MethodSpec
from readout.evaluation.methods import build_method, bundle_digest, method_entry, options_of
from readout.evaluation.states import CACHE_VERSION, PER_IMAGE, RowMetrics
from readout.metrics import (
    LOCALISATION_SCORES,
    correlations_from_drops,
    degradation_curves,
    localisation_scores,
    log_spaced_counts,
    num_tiles,
    randomisation_curve,
    randomisation_labels,
    sensitivity_drops,
    top1_probability,
)
from readout.metrics.chunks import logits_of
from readout.metrics.degradation import image_areas
from readout.metrics.paired import key_hashes
from readout.metrics.randomisation import cascading_randomisation
from readout.split import folded_copy


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
        needy = [row for row in self.rows if method_entry(row.spec).estimates]
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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (collective when a process group runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
