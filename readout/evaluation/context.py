"""The contract every evaluation method keeps, and the pieces the methods share
(:mod:`readout.evaluation.methods`, :mod:`readout.evaluation.baselines`)."""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from readout.attributor import BottleneckAttributor, Explanation
from readout.bundle import load, readout_state
from readout.classifier import LOGITS, Classifier, out_of_place
from readout.metrics.chunks import resolve_targets
from readout.readout_bottleneck import ReadoutBottleneck
from readout.statistics_cache import DEFAULT_CACHE, StatisticsSource, with_cached_statistics

Reduction = Literal["sum", "abs-sum", "max-abs", "mean"]


class Attributor(Protocol):
    """The common contract: images (B, 3, H, W) in [0, 1], target (B,) or None -> map (B, H, W)."""

    def __call__(self, images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class MethodSpec:
    """One row of an evaluation: its display name, a registry key and that method's options."""

    name: str
    """Row label in tables and plots, e.g. ``Per-Sample β=10/k``; unique within a config."""
    method: str
    """Registry key, e.g. ``per-sample`` (see :data:`METHODS`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the method's factory, e.g. ``{beta: 10}``."""


# ---------------------------------------------------------------------------------------------------------
# Small pieces shared by the methods


def reduce_channels(attributions: torch.Tensor, how: Reduction) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) float32 (see the module docstring for each reduction)."""
    if how == "sum":
        reduced = attributions.sum(dim=1)
    elif how == "abs-sum":
        reduced = attributions.abs().sum(dim=1)
    elif how == "max-abs":
        reduced = attributions.abs().amax(dim=1)
    elif how == "mean":
        reduced = attributions.mean(dim=1)
    else:
        raise ValueError(f"unknown reduction {how!r}; valid: sum, abs-sum, max-abs, mean")
    return reduced.detach().float()


def content_seed(tensor: torch.Tensor, salt: int = 0) -> int:
    """A 63-bit seed that depends only on ``tensor``'s values (and ``salt``): same pixels, same noise."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(f"{salt}:".encode() + data).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def private_copy(classifier: Classifier) -> Classifier:
    """A deep copy of the classifier with every in-place operation out-of-place, for hooking methods."""
    model = copy.deepcopy(classifier)
    out_of_place(model)
    return model


def last_spatial_tap(classifier: Classifier) -> str:
    """The deepest tap with a spatial output: the paper's Grad-CAM layer (the last convolutional one)."""
    named = [name for name in classifier.layer_names() if name != LOGITS]
    spatial = [info for info in classifier.tap_info(named) if info.spatial]
    if not spatial:
        raise ValueError(f"classifier {classifier.name!r} has no spatial tap for Grad-CAM")
    runs = classifier.runs()
    return max(spatial, key=lambda info: runs[info.path].finished).name


# ---------------------------------------------------------------------------------------------------------
# Bottleneck bases, shared between rows


class SharedExplanation:
    """A bottleneck attributor whose last explanation is kept, so that several rows built on the same
    fit (Per-Sample β=10/k and Relevance-IBA on it) fit once per batch.

    The noise of a fit is seeded from the batch's pixels (``seed`` mixed in) when the attributor has a
    generator. The memory is one batch: the images tensor itself (identity and version) and the target.
    """

    def __init__(self, attributor: BottleneckAttributor, seed: int = 0) -> None:
        self.attributor = attributor
        self.seed = seed
        self._last: tuple[torch.Tensor, int, torch.Tensor, Explanation] | None = None

    def explain(self, images: torch.Tensor, target: torch.Tensor | None = None) -> Explanation:
        classifier = self.attributor.classifier
        target = resolve_targets(classifier, images, target, len(images), classifier.num_classes)
        if self._last is not None:
            seen, version, seen_target, explanation = self._last
            if seen is images and version == images._version and torch.equal(seen_target, target):
                return explanation
        generator = getattr(self.attributor, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(content_seed(images, self.seed))
        explanation = self.attributor.explain(images, target)
        self._last = (images, images._version, target, explanation)
        return explanation


@dataclass
class MethodContext:
    """What the factories need beyond the classifier: where the Per-Sample μ/σ come from, and the
    bottleneck bases that rows of the same evaluation share.

    ``statistics_shards`` or ``statistics_images`` (image files or globs): whose images give μ/σ (the
    classifier's training data); neither uses
    :mod:`readout.statistics_cache`'s synthetic images (synthetic classifier only). Estimates are
    cached on disk under ``statistics_cache``, with the key explain uses too, so they share them.
    ``share``: build each distinct bottleneck base once per classifier object. Turn it off for
    classifiers that change in place (the randomisation check re-initialises one copy step by step).
    """

    statistics_shards: str | None = None
    statistics_samples: int = 2000
    statistics_cache: str = str(DEFAULT_CACHE)
    statistics_images: list[str] | None = None
    share: bool = True
    device: str = "cpu"
    """Where a bundle's own classifier goes (:meth:`readout` without a classifier)."""
    allow_import: bool = False
    """Whether a bundle's own classifier may be rebuilt from an import path (runs that code)."""
    _bases: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _shared: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _bundles: dict[str, ReadoutBottleneck] = field(default_factory=dict, repr=False)

    def unshared(self) -> MethodContext:
        """The same sources without sharing (for the randomisation check); bundles stay cached."""
        return MethodContext(
            self.statistics_shards,
            self.statistics_samples,
            self.statistics_cache,
            self.statistics_images,
            share=False,
            device=self.device,
            allow_import=self.allow_import,
            _bundles=self._bundles,
        )

    def base(
        self, classifier: Classifier, key: tuple, build: Callable[[], BottleneckAttributor], seed: int = 0
    ) -> SharedExplanation:
        """The shared base ``key`` on ``classifier``, built by ``build`` the first time (or every time
        when not sharing)."""
        if not self.share:
            return self._remember(SharedExplanation(build(), seed))
        bases = self._bases.setdefault(classifier, {})
        if key not in bases:
            bases[key] = self._remember(SharedExplanation(build(), seed))
        return bases[key]

    def shared(self, attributor: BottleneckAttributor) -> SharedExplanation:
        """The shared base of ``attributor`` (made by :meth:`base`), or a new one around it."""
        if attributor not in self._shared:
            self._shared[attributor] = SharedExplanation(attributor)
        return self._shared[attributor]

    def _remember(self, shared: SharedExplanation) -> SharedExplanation:
        self._shared[shared.attributor] = shared
        return shared

    def estimate(self, attributor: BottleneckAttributor) -> None:
        """Loads the attributor's μ/σ from the statistics cache (shared with explain), or estimates and
        caches them."""
        source = StatisticsSource(
            tuple(self.statistics_images or ()), self.statistics_shards, self.statistics_samples
        )
        with_cached_statistics(attributor, source, self.statistics_cache)

    def readout(self, classifier: Classifier | None, bundle: str) -> ReadoutBottleneck:
        """The bundle's readout on ``classifier`` (None: on the classifier the bundle names, on
        :attr:`device`).

        The first load checks the bundle against the classifier (fingerprint). Later calls for other
        classifiers (randomised copies) transplant the trained readout onto them without the check:
        the paper does not retrain the readout after randomisation either.
        """
        if classifier is None:
            if bundle not in self._bundles:
                self._bundles[bundle] = load(bundle, device=self.device, allow_import=self.allow_import)
            return self._bundles[bundle]
        device = classifier.mean.device
        if bundle not in self._bundles:
            self._bundles[bundle] = load(bundle, classifier=classifier, device=device)
        trained = self._bundles[bundle]
        if trained.classifier is classifier:
            return trained
        attributor = ReadoutBottleneck(
            classifier,
            trained.layer,
            trained.taps,
            sigma=trained.bottleneck.sigma,
            min_std=trained.statistics.min_std,
            active_threshold=trained.statistics.active_threshold,
            hidden=trained.hidden,
        )
        attributor.load_state_dict(readout_state(trained), strict=False)
        return attributor.to(device).eval()
