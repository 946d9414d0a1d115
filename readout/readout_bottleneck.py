"""The Readout Bottleneck attributor: one forward pass of the classifier gives a heatmap.

A first pass collects the readout taps (and the activation at the bottleneck) without gradients;
the readout network predicts α from them; the bottleneck measures the information that α lets
through. Training adds a second pass that runs only the layers after the bottleneck on the noisy
activation (:func:`readout_loss`, called by readout.training.module and the bench); inference needs
no second pass at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from readout.attributor import BottleneckAttributor, Explanation
from readout.bottleneck import LN2, FeatureStatistics, information_map
from readout.classifier import Classifier, as_classifier
from readout.readout_net import ReadoutNet
from readout.taps import FeatureTaps
from readout.targets import checked_target


class ReadoutBottleneck(BottleneckAttributor):
    """``ReadoutBottleneck(classifier, layer, taps)(images, target=None) -> (B, H, W)`` bits per pixel.

    ``layer`` and ``taps`` default to the classifier's (``classifier.defaults``): the paper's (Table 4)
    for resnet50 (conv2_3, reading conv2_3, conv3_4, conv4_6, conv5_3 and fc) and vgg16 (conv3_1,
    reading conv3_1, conv4_1, conv5_1, conv5_3, fc); for other models the end of the stride-4 stage,
    reading the end of every stage and the logits (:func:`readout.classifier.default_layers`).
    The readout's statistics (one :class:`FeatureStatistics` per tap) are part of the state dict.
    ``hidden``: the readout net's first hidden width (default: the paper's, half its input channels).
    """

    def __init__(
        self,
        classifier: Classifier | nn.Module,
        layer: str | None = None,
        taps: list[str] | None = None,
        sigma: float = 1.0,
        min_std: float = 0.01,
        active_threshold: float = 0.01,
        init_alpha: float = 5.0,
        hidden: int | None = None,
    ) -> None:
        classifier = as_classifier(classifier)
        layer = layer or classifier.defaults.readout_layer
        super().__init__(classifier, layer, sigma, min_std, active_threshold)
        self.taps = list(taps or classifier.defaults.readout_taps)
        infos = classifier.tap_info(self.taps)
        shapes = [(i.channels, i.height, i.width) if i.spatial else (i.channels,) for i in infos]
        device = classifier.mean.device  # on the classifier's device, as the bottleneck (see the base)
        self.readout_statistics = nn.ModuleList(
            FeatureStatistics(s, min_std, active_threshold) for s in shapes
        ).to(device)
        self.net = ReadoutNet(sum(s[0] for s in shapes), self.shape[0], init_alpha, hidden).to(device)
        self.hidden = hidden

    @property
    def tap_statistics(self) -> list[FeatureStatistics]:
        """One statistics per readout tap, in the order of ``taps``."""
        return [cast(FeatureStatistics, statistics) for statistics in self.readout_statistics]

    def first_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """One classifier pass without gradients: (logits, R at the bottleneck, readout features)."""
        with torch.no_grad(), FeatureTaps(self.classifier, [self.layer, *self.taps]) as taps:
            logits = self.classifier(images)
        return logits, taps.features[self.layer], [taps.features[name] for name in self.taps]

    def alpha(self, readout_features: list[torch.Tensor]) -> torch.Tensor:
        """α (B, C, h, w) from the readout features."""
        size = (self.shape[1], self.shape[2])
        return self.net(readout_features, self.tap_statistics, size)

    def update_statistics(self, images: torch.Tensor) -> None:
        _, features, readout = self.first_pass(images)
        self.statistics.update(features)
        for statistics, x in zip(self.tap_statistics, readout, strict=True):
            statistics.update(x)

    def all_statistics(self) -> list[FeatureStatistics]:
        return [self.statistics, *self.tap_statistics]

    def explain(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> Explanation:
        self.check_images(images)
        logits, features, readout = self.first_pass(images)
        target = self.resolve_target(logits, target)
        with torch.no_grad():
            alpha = self.alpha(readout)
            z, kl = self.bottleneck(features, alpha, torch.randn_like(features))
            noisy = self.logits_after(z, images).softmax(1)
            lam, _ = self.bottleneck.lambdas(alpha)
        return Explanation(
            heatmap=information_map(kl, tuple(images.shape[-2:])),
            information=kl / LN2,
            lam=lam,
            features=features,
            target=target,
            probability=logits.softmax(1).gather(1, target[:, None])[:, 0],
            probability_bottleneck=noisy.gather(1, target[:, None])[:, 0],
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
        """The heatmap alone: one classifier pass and the readout net, no pass through the suffix.

        The readout's α does not depend on the target (the paper's readout reads the logits instead),
        so ``target`` is accepted for the common call contract only; a bad one is still refused.
        """
        self.check_images(images)
        if target is not None:
            checked_target(target, len(images), self.classifier.num_classes, images.device)
        _, features, readout = self.first_pass(images)
        kl = self.bottleneck.information(features, self.alpha(readout))
        return information_map(kl, tuple(images.shape[-2:]))


@dataclass(frozen=True)
class ReadoutLoss:
    """The training loss of a readout on one batch and what it was made of."""

    loss: torch.Tensor
    """CE + β/k·mean ΣKL (+ the distillation term): a scalar with the readout net's gradients."""
    ce: torch.Tensor
    """Cross-entropy of the classifier after the bottleneck against the labels."""
    information: torch.Tensor
    """(B,) nats through the bottleneck per image."""
    kl: torch.Tensor
    """(B, C, h, w) the information per element, nats."""
    logits: torch.Tensor
    """(B, classes) the classifier without the bottleneck."""
    logits_bottleneck: torch.Tensor
    """(B, classes) the classifier with the bottleneck inserted."""
    distill: torch.Tensor | None = None
    """The distillation term (:func:`distill_loss`) before its weight, where a teacher was given."""

    @property
    def bits(self) -> torch.Tensor:
        """Mean bits per image through the bottleneck."""
        return self.information.mean() / LN2


def readout_loss(
    attributor: ReadoutBottleneck,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor],
    beta: float,
    teacher: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> ReadoutLoss:
    """The Readout Bottleneck's loss (paper, Sec. 3.2): CE(classifier after the bottleneck, label) +
    β/k·Σ KL, mean over the batch, with β = ``beta``/k.

    ``noise(features)`` gives the standard normal ε of the bottleneck, shaped as the features (the
    training module draws it per sample key and step, so that it does not depend on ranks or batch
    positions). ``teacher`` (B, 1, H, W): Per-Sample maps over the same crops; with ``distill_weight``
    > 0 the loss adds that weight times :func:`distill_loss`.
    """
    logits, features, readout = attributor.first_pass(images)
    alpha = attributor.alpha(readout)
    z, kl = attributor.bottleneck(features, alpha, noise(features))
    logits_bottleneck = attributor.logits_after(z, images)
    ce = F.cross_entropy(logits_bottleneck, labels)
    information = kl.flatten(1).sum(1)
    loss = ce + beta / attributor.k * information.mean()
    distill = None
    if distill_weight and teacher is not None:
        distill = distill_loss(kl, teacher)
        loss = loss + distill_weight * distill
    return ReadoutLoss(loss, ce, information, kl, logits, logits_bottleneck, distill)


def distill_loss(kl: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(teacher ‖ readout) between where two maps place their information, mean over the batch.

    ``kl``: the readout's information (B, C, h, w); ``teacher``: the Per-Sample maps (B, 1, H, W)
    over the same crops, averaged down to (h, w). Each map, summed over channels, is made a
    distribution over the h·w locations, so the term shapes *where* the information goes and
    leaves *how much* to CE + β·KL. Zero when the readout's map is the teacher's up to scale.
    """
    grid = (int(kl.shape[-2]), int(kl.shape[-1]))
    target = F.adaptive_avg_pool2d(teacher.float(), grid).flatten(1).clamp_min(0) + eps
    target = target / target.sum(1, keepdim=True)
    student = kl.sum(1).flatten(1).clamp_min(0) + eps
    log_student = student.log() - student.sum(1, keepdim=True).log()
    return (target * (target.log() - log_student)).sum(1).mean()
