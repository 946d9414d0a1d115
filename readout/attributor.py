"""What every bottleneck attributor shares: the split classifier, the statistics, the call contract.

Contract (as captum's ``attribute``): ``attributor(images, target=None) -> (B, H, W)`` heatmap in bits
per pixel, where ``images`` are float (B, 3, H, W) in [0, 1] at the classifier's input size and
``target`` is (B,) class indices or None for the classifier's top-1. ``explain`` returns the same
map with everything else a user or a report wants to know (:class:`Explanation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from readout.bottleneck import FeatureStatistics, InformationBottleneck
from readout.classifier import Classifier, as_classifier
from readout.split import Split
from readout.targets import resolve_target

#: How far outside [0, 1] image values may lie (rounding of resizes and dtype casts).
RANGE_TOLERANCE = 1e-5


@dataclass
class Explanation:
    """One batch of attributions. Shapes: B images, bottleneck (C, h, w), input (H, W)."""

    heatmap: torch.Tensor
    """(B, H, W), bits per pixel; each map sums to ``total_bits``."""
    information: torch.Tensor
    """(B, C, h, w), bits per element at the bottleneck."""
    lam: torch.Tensor
    """(B, C, h, w), λ: the share of the signal that passes."""
    features: torch.Tensor
    """(B, C, h, w), R: the clean activation at the bottleneck."""
    target: torch.Tensor
    """(B,), the class explained."""
    probability: torch.Tensor
    """(B,), the target's softmax probability without the bottleneck."""
    probability_bottleneck: torch.Tensor
    """(B,), the target's probability with the bottleneck inserted (mean over noise copies)."""

    @property
    def total_bits(self) -> torch.Tensor:
        """(B,), bits that pass the bottleneck per image."""
        return self.information.sum(dim=(1, 2, 3))


def images_of(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Accepts an image tensor or a batch dict of the data layer (key ``image``)."""
    return batch["image"] if isinstance(batch, Mapping) else batch


class BottleneckAttributor(nn.Module):
    """Base of the Per-Sample and Readout attributors: a frozen classifier split at ``layer``.

    Subclasses implement :meth:`explain`. The bottleneck's statistics come from :meth:`estimate`
    (or a loaded state dict) and are stored with the attributor's state.
    """

    def __init__(
        self,
        classifier: Classifier | nn.Module,
        layer: str,
        sigma: float = 1.0,
        min_std: float = 0.01,
        active_threshold: float = 0.01,
    ) -> None:
        super().__init__()
        classifier = as_classifier(classifier)
        self.classifier = classifier
        self.layer = layer
        (info,) = classifier.tap_info([layer])
        if not info.spatial or info.path == "":
            raise ValueError(
                f"layer {layer!r} of {classifier.name!r} cannot hold the bottleneck: it needs a (B, C, h, w) "
                f"map strictly before the logits, and {layer!r} gives (B, {info.channels})"
            )
        self.shape = (info.channels, info.height, info.width)
        # Made on the classifier's device: an attributor built around a classifier already on the GPU
        # must not keep its statistics on the CPU until someone calls .to().
        self.bottleneck = InformationBottleneck(
            FeatureStatistics(self.shape, min_std, active_threshold), sigma
        ).to(classifier.mean.device)

    # The split is made on demand, not stored as a submodule: the classifier's weights stay registered
    # once (under ``classifier.``), so state dicts and checkpoints do not hold three copies.
    @property
    def split(self) -> Split:
        """The classifier cut at ``layer`` (traced, or the hook path; see :mod:`readout.split`)."""
        return self.classifier.split(self.layer)

    def logits_after(self, z: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits with ``z`` (N, C, h, w) at the bottleneck for ``images`` (B, 3, H, W) in [0, 1],
        N a multiple of B (each image's rows together)."""
        return self.split.logits(z, self.classifier.normalize(images))

    @property
    def statistics(self) -> FeatureStatistics:
        return self.bottleneck.statistics

    @property
    def k(self) -> int:
        """Number of elements at the bottleneck, k = h·w·c (the β = 10/k of the paper)."""
        c, h, w = self.shape
        return c * h * w

    def check_images(self, images: torch.Tensor) -> None:
        """Raises ValueError unless ``images`` are float (B, 3, S, S) in [0, 1] at the input size S.

        Values up to :data:`RANGE_TOLERANCE` outside [0, 1] pass (rounding of resizes and casts);
        NaN does not.
        """
        size = self.classifier.input_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}) in [0, 1] for {self.classifier.name!r}, "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floats in [0, 1] (the attributor normalises them itself), got {images.dtype}"
            )
        inside = (images >= -RANGE_TOLERANCE) & (images <= 1 + RANGE_TOLERANCE)
        if not bool(inside.all()):
            low, high = images.min().item(), images.max().item()
            raise ValueError(
                f"images must be floats in [0, 1] (the attributor normalises them itself), "
                f"got values in [{low:.4g}, {high:.4g}]"
            )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """R = the clean activation at the bottleneck, (B, C, h, w)."""
        return self.split.features(self.classifier.normalize(images))

    @torch.no_grad()
    def estimate(
        self,
        batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
        max_samples: int | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Adds the activations of ``batches`` to every statistics the attributor holds (μ, σ over data),
        then sums them over ranks when a process group is running; True.

        ``stop``: asked before each batch; when it says so the estimate ends there and returns False,
        with the sums of this process so far (not summed over ranks): a part to continue from.
        """
        device = self.classifier.mean.device
        done = int(self.statistics.count.item())
        bar = tqdm(total=max_samples, initial=done, desc="estimating μ/σ", unit="img", disable=not progress)
        for batch in batches:
            if stop is not None and stop():
                bar.close()
                return False
            images = images_of(batch).to(device)
            if max_samples is not None:
                images = images[: max_samples - int(self.statistics.count.item())]
            self.update_statistics(images)
            bar.update(len(images))
            if max_samples is not None and self.statistics.count.item() >= max_samples:
                break
        bar.close()
        for statistics in self.all_statistics():
            statistics.all_reduce()
        return True

    def update_statistics(self, images: torch.Tensor) -> None:
        """Adds one batch of images to the statistics; subclasses with more statistics extend it."""
        self.statistics.update(self.features(images))

    def all_statistics(self) -> list[FeatureStatistics]:
        return [self.statistics]

    @staticmethod
    def resolve_target(logits: torch.Tensor, target: torch.Tensor | int | None) -> torch.Tensor:
        """(B,) target classes: the given ones, checked, or the top-1 of ``logits`` (B, K)
        (:func:`readout.targets.resolve_target`)."""
        batch, classes = logits.shape
        return resolve_target(target, batch, logits.device, lambda: logits, classes)

    def explain(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> Explanation:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.explain(images, target).heatmap
