"""The baseline rows of the evaluation: captum's gradient and perturbation methods,
LRP (zennit) and random maps."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

from readout.classifier import Classifier
from readout.evaluation.context import (
    Attributor,
    MethodContext,
    Reduction,
    content_seed,
    last_spatial_tap,
    private_copy,
    reduce_channels,
)
from readout.lrp import RelevancePropagator, input_bounds, lrp_defaults
from readout.metrics.chunks import resolve_targets
from readout.metrics.tiles import Baseline, baseline_images
from readout.taps import tap_module

# ---------------------------------------------------------------------------------------------------------
# Baselines through captum and zennit


class ChannelMethod:
    """A per-channel attribution ``attribute(model, images, target) -> (B, C, H, W)`` on a private
    copy of the classifier, reduced over channels."""

    def __init__(
        self,
        classifier: Classifier,
        attribute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        reduce: Reduction,
        noise_seed: int | None = None,
    ) -> None:
        self.model = classifier
        self.attribute = attribute
        self.reduce = reduce
        self.noise_seed = noise_seed

    def __call__(self, images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = resolve_targets(self.model, images, target, len(images))
        inputs = images.detach().clone().requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU", category=UserWarning)
            if self.noise_seed is None:
                attributions = self.attribute(inputs, target)
            else:
                devices = [images.device.index or 0] if images.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(content_seed(images, self.noise_seed))
                    attributions = self.attribute(inputs, target)
        return reduce_channels(attributions, self.reduce)


def saliency(classifier: Classifier, context: MethodContext, reduce: Reduction = "max-abs") -> Attributor:
    """Gradient magnitude of the target logit (Simonyan et al. 2014)."""
    model = private_copy(classifier)
    method = Saliency(model)
    return ChannelMethod(model, lambda x, t: method.attribute(x, target=t, abs=True), reduce)


def integrated_gradients(
    classifier: Classifier,
    context: MethodContext,
    steps: int = 50,
    baseline: Baseline = "mean",
    internal_batch_size: int = 256,
    reduce: Reduction = "abs-sum",
) -> Attributor:
    """Integrated Gradients from ``baseline`` (default: each image's channel means, as the paper)."""
    model = private_copy(classifier)
    method = IntegratedGradients(model)

    def attribute(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        start = torch.broadcast_to(baseline_images(images, baseline), images.shape).contiguous()
        return method.attribute(
            images, baselines=start, target=target, n_steps=steps, internal_batch_size=internal_batch_size
        )

    return ChannelMethod(model, attribute, reduce)


def smoothgrad(
    classifier: Classifier,
    context: MethodContext,
    samples: int = 50,
    noise: float = 0.15,
    batch_samples: int = 10,
    seed: int = 0,
    reduce: Reduction = "max-abs",
) -> Attributor:
    """SmoothGrad of Saliency: mean |gradient| over ``samples`` noisy copies, σ = ``noise`` (images lie
    in [0, 1], so σ is ``noise`` times their range: the SmoothGrad paper's 15%)."""
    model = private_copy(classifier)
    method = NoiseTunnel(Saliency(model))

    def attribute(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return method.attribute(
            images,
            nt_type="smoothgrad",
            nt_samples=samples,
            nt_samples_batch_size=batch_samples,
            stdevs=noise,
            target=target,
            abs=True,
        )

    return ChannelMethod(model, attribute, reduce, noise_seed=seed)


def grad_cam(
    classifier: Classifier,
    context: MethodContext,
    layer: str | None = None,
    interpolate: str = "bilinear",
) -> Attributor:
    """Grad-CAM at tap ``layer`` (default: the last spatial tap), ReLU'd and upsampled to the image."""
    model = private_copy(classifier)
    method = LayerGradCam(model, tap_module(model, layer or last_spatial_tap(classifier)))

    def attribute(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cam = method.attribute(images, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode=interpolate)

    return ChannelMethod(model, attribute, "sum")


def guided_backprop(
    classifier: Classifier, context: MethodContext, reduce: Reduction = "max-abs"
) -> Attributor:
    """Guided Backpropagation (Springenberg et al. 2014)."""
    model = private_copy(classifier)
    method = GuidedBackprop(model)
    return ChannelMethod(model, lambda x, t: method.attribute(x, target=t), reduce)


def guided_grad_cam(
    classifier: Classifier,
    context: MethodContext,
    layer: str | None = None,
    interpolate: str = "bilinear",
    reduce: Reduction = "max-abs",
) -> Attributor:
    """Guided Grad-CAM: Guided BP times the upsampled Grad-CAM of ``layer`` (default: last spatial tap)."""
    model = private_copy(classifier)
    method = GuidedGradCam(model, tap_module(model, layer or last_spatial_tap(classifier)))
    return ChannelMethod(
        model, lambda x, t: method.attribute(x, target=t, interpolate_mode=interpolate), reduce
    )


def occlusion(
    classifier: Classifier,
    context: MethodContext,
    window: int = 8,
    stride: int | None = None,
    baseline: Baseline = "mean",
    per_eval: int = 4,
    reduce: Reduction = "mean",
) -> Attributor:
    """Occlusion (Zeiler & Fergus 2014): the drop of the target logit when a ``window`` px square
    (moved by ``stride``, default ``window``) takes the baseline (default: the image's channel means)."""
    model = private_copy(classifier)
    method = Occlusion(model)
    step = stride or window

    def attribute(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fill = torch.broadcast_to(baseline_images(images, baseline), images.shape).contiguous()
        return method.attribute(
            images,
            sliding_window_shapes=(images.shape[1], window, window),
            strides=(images.shape[1], step, step),
            baselines=fill,
            target=target,
            perturbations_per_eval=per_eval,
        )

    return ChannelMethod(model, attribute, reduce)


def lrp(
    classifier: Classifier,
    context: MethodContext,
    composite: str | None = None,
    canonizer: str | None = None,
) -> Attributor:
    """LRP through the whole classifier with zennit (:mod:`readout.lrp`), one-hot relevance at the
    target logit; signed, summed over channels. Defaults: the classifier's (EpsilonPlusFlat)."""
    defaults = lrp_defaults(classifier)
    low, high = input_bounds(classifier.mean, classifier.std)
    propagator = RelevancePropagator(
        classifier.model, composite or defaults.composite, canonizer or defaults.canonizer, low, high
    ).to(classifier.mean.device)

    def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = resolve_targets(classifier, images, target, len(images), classifier.num_classes)
        start = F.one_hot(target, classifier.num_classes).to(images.dtype)
        _, relevance = propagator(classifier.normalize(images), start)
        return reduce_channels(relevance, "sum")

    return attribute


def random_map(classifier: Classifier, context: MethodContext, seed: int = 0) -> Attributor:
    """Uniform noise in [0, 1), drawn per image from a seed of its pixels: the chance baseline."""

    def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        height, width = images.shape[-2:]
        maps = [
            torch.rand(height, width, generator=torch.Generator().manual_seed(content_seed(image, seed)))
            for image in images
        ]
        return torch.stack(maps).to(images.device)

    return attribute
