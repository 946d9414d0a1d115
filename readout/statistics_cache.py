"""μ/σ of a bottleneck over data, estimated once per classifier, layer and data source, kept on disk.

The Per-Sample Bottleneck needs the per-feature mean and std of the feature map it sits on, over
images like those it explains. :class:`StatisticsSource` says which images (files or globs, shards,
or the synthetic set for the synthetic classifier); :func:`with_cached_statistics` loads the
statistics from the cache when they were estimated before, else estimates and stores them. The cache
key is the classifier's fingerprint, the layer, the source and the number of samples, so
``readout.explain`` and ``readout.evaluate`` share entries.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from readout.atomic import atomic_write
from readout.attributor import BottleneckAttributor
from readout.bundle import classifier_fingerprint
from readout.images import BadImage, expand_images, load_image

DEFAULT_CACHE = Path.home() / ".cache" / "readout" / "statistics"

#: The synthetic images' seed for μ/σ: distinct from the classifier's training and held-out seeds.
SYNTHETIC_SEED = 777


class MissingStatisticsData(ValueError):
    """No images were named for μ/σ, and the classifier is not the synthetic one."""


@dataclass(frozen=True)
class StatisticsSource:
    """Which images give μ/σ: ``images`` (files or globs; files that are not images are skipped with
    a message), else ``shards`` (a shard pattern, read with the evaluation transform), else the
    synthetic set (synthetic classifier only). ``samples``: how many images at most."""

    images: tuple[str, ...] = ()
    shards: str | None = None
    samples: int = 2000

    @property
    def name(self) -> str:
        """The source as the cache key spells it."""
        return "|".join(self.images) or self.shards or f"synthetic:{SYNTHETIC_SEED}"

    def batches(self, architecture: str, size: int) -> Iterator[torch.Tensor]:
        """(B, 3, size, size) images in [0, 1]; raises :class:`MissingStatisticsData` when there are none
        to take for ``architecture``."""
        if self.images:
            files = expand_images(list(self.images))[: self.samples]
            for start in range(0, len(files), 32):
                images = []
                for file in files[start : start + 32]:
                    try:
                        images.append(load_image(file, size))
                    except BadImage as error:
                        print(f"skipped for μ/σ: {error}", file=sys.stderr)
                if images:
                    yield torch.stack(images)
            return
        if self.shards:
            from readout.data.shards import make_loader
            from readout.data.transforms import eval_transform

            transform = eval_transform(resize=size, crop=size)
            loader = make_loader(self.shards, "eval", batch_size=32, num_workers=2, transform=transform)
            for batch in loader:
                yield batch["image"]
            return
        if architecture != "synthetic-cnn":
            raise MissingStatisticsData(
                f"the per-sample bottleneck needs μ/σ over data for {architecture!r}: name images of "
                f"its training data (explain: --estimate-images or --estimate-shards; evaluate: "
                f"statistics.images or statistics.shards)"
            )
        from readout.data.synthetic import synthetic_batch

        for start in range(0, self.samples, 64):
            count = min(64, self.samples - start)
            yield synthetic_batch(count, size, seed=SYNTHETIC_SEED, start=start)["image"]


def cache_path(attributor: BottleneckAttributor, source: StatisticsSource, cache: str | Path) -> Path:
    """Where ``attributor``'s statistics over ``source`` are kept under ``cache``."""
    key = "|".join(
        [classifier_fingerprint(attributor.classifier), attributor.layer, source.name, str(source.samples)]
    )
    return Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def with_cached_statistics(
    attributor: BottleneckAttributor, source: StatisticsSource, cache: str | Path = DEFAULT_CACHE
) -> None:
    """Loads the attributor's statistics from ``cache``, or estimates them over ``source`` and stores
    them there (written atomically; an unreadable entry is estimated again and replaced)."""
    path = cache_path(attributor, source, cache)
    if path.is_file():
        try:
            attributor.statistics.load_state_dict(load_file(str(path)))
            return
        except (SafetensorError, RuntimeError, OSError) as error:
            print(f"μ/σ cache entry {path} is unreadable ({error}); estimating again", file=sys.stderr)
    classifier = attributor.classifier
    batches = source.batches(classifier.name, classifier.input_size)
    attributor.estimate(batches, max_samples=source.samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = attributor.statistics.state_dict()
    atomic_write(str(path), save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
