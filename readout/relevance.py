"""Relevance-IBA (Chen et al.): the bottleneck's information, propagated to the pixels with LRP.

A bottleneck attributor (Per-Sample or Readout) says how many bits pass each element (c, y, x) of the
feature map at its layer. IBA upsamples that map to the image; Relevance-IBA instead injects it as the
relevance at the bottleneck layer and propagates it through the layers before the bottleneck to the
input, layer by layer (:mod:`readout.lrp`), on the clean image: no noise below the bottleneck.

The heatmap is the input relevance summed over colour channels, (B, H, W), in bits per pixel and
signed (rules such as alpha-beta give negative relevance). When the rules conserve relevance, each map
sums to the relevance injected; ``conservation`` reports the ratio. Under the default EpsilonPlusFlat it
is not exact behind a ResNet's projection shortcut, where z+ drops relevance (:mod:`readout.lrp`);
``composite="EpsilonPlusFlatZPlusFallback"`` keeps it at 1 up to rounding (figures: docs/relevance.md).

Injections (``INJECTIONS``), (B, C, h, w) bits:

- ``information``: the per-element information (KL in bits), as in the paper.
- ``lambda-activation``: λ·R, the signal that passes, rescaled per image to the image's total bits so
  that the map stays in bits per pixel.

``mask_dead`` zeroes the injection on units that a ReLU zeroes (R ≤ 0): at a tap after a ReLU those
are the units with R = 0, which carry information (their KL is not zero when μ > 0) but no signal.

Precision: in float32 the maps are not exactly batch independent (nor equal between CPU and GPU).
Convolutions round differently per batch size (about 1e-6), and zennit's ``Norm`` rule at a residual
sum, x_i / (a + b) · R, magnifies that where a + b nearly cancels, up to a visible change of single
pixels. Where maps must agree across batch sizes or devices, run in float64 (``.double()`` on the
attributor and the images): there they agree to about 1e-9 of the map's largest value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from readout.attributor import BottleneckAttributor, Explanation
from readout.lrp import RelevancePropagator, input_bounds, lrp_defaults

Injection = Literal["information", "lambda-activation"]

#: Below this share of the injected relevance reaching the pixels, a warning is logged (once).
LOW_CONSERVATION = 0.95

log = logging.getLogger(__name__)


def inject_information(explanation: Explanation) -> torch.Tensor:
    """(B, C, h, w) bits: the information per element."""
    return explanation.information


def inject_lambda_activation(explanation: Explanation) -> torch.Tensor:
    """(B, C, h, w): λ·R, rescaled so that each image's injection sums to its total bits."""
    signal = explanation.lam * explanation.features
    total = signal.sum(dim=(1, 2, 3), keepdim=True)
    bits = explanation.total_bits.view(-1, 1, 1, 1)
    return signal * torch.where(total != 0, bits / total, torch.zeros_like(total))


INJECTIONS: dict[str, Callable[[Explanation], torch.Tensor]] = {
    "information": inject_information,
    "lambda-activation": inject_lambda_activation,
}


@dataclass
class RelevanceExplanation:
    """One batch of Relevance-IBA attributions. Shapes: B images, bottleneck (C, h, w), input (H, W)."""

    heatmap: torch.Tensor
    """(B, H, W), signed bits per pixel: the input relevance summed over colour channels."""
    relevance: torch.Tensor
    """(B, 3, H, W), input relevance per colour channel."""
    injected: torch.Tensor
    """(B, C, h, w), the relevance injected at the bottleneck, bits."""
    conservation: torch.Tensor
    """(B,), total input relevance / total injected relevance (1 when the rules conserve it)."""
    base: Explanation
    """The bottleneck attributor's explanation (its ``heatmap`` is the upsampled IBA map)."""

    # The base's fields, so that code written for an Explanation (reports, the explain CLI) reads this too.
    @property
    def target(self) -> torch.Tensor:
        return self.base.target

    @property
    def probability(self) -> torch.Tensor:
        return self.base.probability

    @property
    def probability_bottleneck(self) -> torch.Tensor:
        return self.base.probability_bottleneck

    @property
    def total_bits(self) -> torch.Tensor:
        """(B,), bits that pass the bottleneck (the injection's total, unless ``mask_dead`` removed some)."""
        return self.base.total_bits


class RelevanceIBA(nn.Module):
    """``RelevanceIBA(base)(images, target=None) -> (B, H, W)`` signed bits per pixel.

    base: a bottleneck attributor (its ``classifier``, ``layer`` and ``explain`` are used).
    composite: a name in :data:`readout.lrp.COMPOSITES`, None for the classifier's default
    (:data:`readout.lrp.DEFAULTS` for the registry's, else :data:`readout.lrp.AUTO`: canonizers from
    the module types found); canonizer likewise, a name in :data:`readout.lrp.CANONIZERS`.
    The classifier is copied once here: later changes to its weights are not seen. A module without
    an LRP rule is refused by name.
    """

    def __init__(
        self,
        base: BottleneckAttributor,
        composite: str | None = None,
        injection: Injection = "information",
        mask_dead: bool = False,
        canonizer: str | None = None,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; valid: {', '.join(INJECTIONS)}")
        classifier = base.classifier
        if composite is None or canonizer is None:
            defaults = lrp_defaults(classifier)  # hand-chosen for the registry's, else AUTO
            composite = composite or defaults.composite
            canonizer = canonizer or defaults.canonizer
        self.base = base
        self._warned = False  # the low-conservation warning is given once per attributor
        self.injection = injection
        self.mask_dead = mask_dead
        low, high = input_bounds(classifier.mean, classifier.std)
        self.propagator = RelevancePropagator(
            classifier.model, composite, canonizer, low, high, layer=classifier.resolve(base.layer)
        )

    def inject(self, explanation: Explanation) -> torch.Tensor:
        """(B, C, h, w) bits: the relevance put at the bottleneck for ``explanation``."""
        injected = INJECTIONS[self.injection](explanation)
        if self.mask_dead:
            injected = injected * (explanation.features > 0)
        return injected

    def propagate(self, images: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], injected (B, C, h, w) -> input relevance (B, 3, H, W)."""
        _, relevance = self.propagator(self.base.classifier.normalize(images), injected)
        return relevance

    def explain(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> RelevanceExplanation:
        return self.explain_from(images, self.base.explain(images, target))

    def explain_from(self, images: torch.Tensor, base: Explanation) -> RelevanceExplanation:
        """Relevance-IBA from a base explanation of the same images computed already (no second fit)."""
        injected = self.inject(base)
        relevance = self.propagate(images, injected)
        total = injected.sum(dim=(1, 2, 3))
        conservation = relevance.sum(dim=(1, 2, 3)) / total
        if not self._warned and bool((conservation < LOW_CONSERVATION).any()):
            self._warned = True
            log.warning(
                "Relevance-IBA on %r at %r kept only %.3f of the injected relevance for one image "
                "(RelevanceExplanation.conservation has each map's share): the rest went to biases, units "
                "without positive contributions or rules' stabilisers (readout.lrp explains where)",
                self.base.classifier.name,
                self.base.layer,
                float(conservation.min()),
            )
        return RelevanceExplanation(
            heatmap=relevance.sum(dim=1),
            relevance=relevance,
            injected=injected,
            conservation=conservation,
            base=base,
        )

    def forward(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.explain(images, target).heatmap


def relevance_attributor(base: BottleneckAttributor, **options: Any) -> RelevanceIBA:
    """Relevance-IBA on top of ``base``. Options (all optional): ``composite`` (a name in
    :data:`readout.lrp.COMPOSITES`), ``canonizer`` (in :data:`readout.lrp.CANONIZERS`), ``injection``
    (``information`` or ``lambda-activation``), ``mask_dead`` (bool)."""
    return RelevanceIBA(base, **options)
