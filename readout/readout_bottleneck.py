"""The Readout Bottleneck attributor: one forward pass of the classifier gives a heatmap.

A first pass collects the readout taps (and the activation at the bottleneck) without gradients;
the readout network predicts α from them; the bottleneck measures the information that α lets
through. Training (readout.lit) adds a second pass that runs only the layers after the bottleneck on
the noisy activation; inference needs no second pass at all.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from readout.attributor import BottleneckAttributor, Explanation, checked_target
from readout.bottleneck import LN2, FeatureStatistics, information_map
from readout.classifier import Classifier, as_classifier
from readout.readout_net import ReadoutNet
from readout.taps import FeatureTaps


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
