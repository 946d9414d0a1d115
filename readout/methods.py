"""Attribution methods by name, all with one contract: ``method(images, target=None) -> (B, H, W)``.

``images`` are float (B, 3, H, W) in [0, 1] at the classifier's input size (the classifier normalises
inside); ``target`` is (B,) class indices, or None for the classifier's top-1. The map has the input's
resolution, float32, detached, on the images' device; larger means more relevant. Registry keys
(:data:`METHODS`) equal the ``method`` values of the evaluation configs; a factory is called as
``METHODS[key].build(classifier, context, **options)``.

Reductions of per-channel attributions (B, 3, H, W) to (B, H, W) (:func:`reduce_channels`), as the
IBA paper's reference code (Schulz et al. 2020) does unless said otherwise:

================================  ==========================================================  =========
key                               what                                                        reduction
================================  ==========================================================  =========
``per-sample``                    Per-Sample Bottleneck (:mod:`readout.per_sample`), bits      (none)
``readout``                       Readout Bottleneck from a bundle (:mod:`readout.export`)     (none)
``relevance-per-sample``          Relevance-IBA on a Per-Sample fit (:mod:`readout.relevance`) (none)
``relevance-readout``             Relevance-IBA on a readout bundle                            (none)
``saliency``                      captum Saliency, |∂ logit / ∂ x| (Simonyan et al. 2014)      max-abs
``integrated-gradients``          captum IntegratedGradients, mean-image baseline, 50 steps    abs-sum
``smoothgrad``                    captum NoiseTunnel(Saliency), σ = 0.15, 50 samples           max-abs
``grad-cam``                      captum LayerGradCam (ReLU'd), bilinearly upsampled           (none)
``guided-backprop``               captum GuidedBackprop                                        max-abs
``guided-grad-cam``               captum GuidedGradCam (Guided BP x upsampled Grad-CAM)        max-abs
``occlusion``                     captum Occlusion, square windows, mean-image baseline        mean
``lrp``                           zennit over the whole classifier (EpsilonPlusFlat default)   sum
``random``                        uniform noise, a function of the image's pixels              (none)
================================  ==========================================================  =========

- max-abs: max over channels of |a| (the paper's Saliency and Guided BP, Simonyan's saliency map);
- abs-sum: sum over channels of |a| (IG's attributions add up over inputs: the magnitude of each
  pixel's contribution, "Int. Grad. (of Saliency)" in the paper's Table 2);
- sum: signed sum over channels (LRP: relevance is conserved, so the pixel's total);
- mean: mean over channels (Occlusion gives all three channels the same logit drop).

Each captum and LRP method works on a private deep copy of the classifier with every in-place
operation made out-of-place (torchvision blocks use ``ReLU(inplace=True)``, which breaks captum's
backward hooks): the shared classifier is never modified and no hook outlives a call. Methods that
draw noise (Per-Sample, SmoothGrad, Random) seed it from the pixels of the batch (Random: of each
image), so a rerun gives the same maps whatever ran before.

``signed`` methods (LRP, Relevance-IBA) give maps of both signs: plots centre their colour maps on
zero and the randomisation check compares them sign-invariantly (paper, App. G.3).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import fsspec
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
from torch import nn

from readout.attributor import BottleneckAttributor, Explanation
from readout.classifier import LOGITS, Classifier, out_of_place
from readout.export import load, readout_state
from readout.lrp import RelevancePropagator, input_bounds, lrp_defaults
from readout.metrics.tiles import Baseline, baseline_images
from readout.per_sample import PerSample
from readout.precision import Precision
from readout.readout_bottleneck import ReadoutBottleneck
from readout.relevance import RelevanceIBA, relevance_attributor
from readout.statistics_cache import DEFAULT_CACHE, StatisticsSource, with_cached_statistics
from readout.taps import tap_module

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


def resolve_target(classifier: nn.Module, images: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """(B,) long: ``target`` on the images' device, or the classifier's top-1 when None."""
    if target is None:
        with torch.no_grad():
            return classifier(images).argmax(dim=1)
    target = torch.as_tensor(target, device=images.device).long()
    return target.expand(images.shape[0]) if target.dim() == 0 else target


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
        target = resolve_target(self.attributor.classifier, images, target)
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
    _bases: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _bundles: dict[str, ReadoutBottleneck] = field(default_factory=dict, repr=False)

    def unshared(self) -> MethodContext:
        """The same sources without sharing (for the randomisation check); bundles stay cached."""
        return MethodContext(
            self.statistics_shards,
            self.statistics_samples,
            self.statistics_cache,
            self.statistics_images,
            share=False,
            _bundles=self._bundles,
        )

    def base(
        self, classifier: Classifier, key: tuple, build: Callable[[], BottleneckAttributor], seed: int = 0
    ) -> SharedExplanation:
        """The shared base ``key`` on ``classifier``, built by ``build`` the first time (or every time
        when not sharing)."""
        if not self.share:
            return SharedExplanation(build(), seed)
        bases = self._bases.setdefault(classifier, {})
        if key not in bases:
            bases[key] = SharedExplanation(build(), seed)
        return bases[key]

    def estimate(self, attributor: BottleneckAttributor) -> None:
        """Loads the attributor's μ/σ from the statistics cache (shared with explain), or estimates and
        caches them."""
        source = StatisticsSource(
            tuple(self.statistics_images or ()), self.statistics_shards, self.statistics_samples
        )
        with_cached_statistics(attributor, source, self.statistics_cache)

    def readout(self, classifier: Classifier, bundle: str) -> ReadoutBottleneck:
        """The bundle's readout on ``classifier``.

        The first load checks the bundle against the classifier (fingerprint). Later calls for other
        classifiers (randomised copies) transplant the trained readout onto them without the check:
        the paper does not retrain the readout after randomisation either.
        """
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


# ---------------------------------------------------------------------------------------------------------
# Information Bottleneck methods


def _per_sample_base(
    classifier: Classifier,
    context: MethodContext,
    layer: str | None,
    beta: float,
    steps: int,
    copies: int,
    seed: int,
    sigma: float = 1.0,
    precision: Precision = "auto",
    compile: bool = False,
) -> SharedExplanation:
    def build() -> BottleneckAttributor:
        attributor = PerSample(
            classifier,
            layer=layer,
            beta=beta,
            steps=steps,
            copies=copies,
            sigma=sigma,
            seed=seed,
            precision=precision,
            compile=compile,
        )
        context.estimate(attributor)
        return attributor.to(classifier.mean.device)

    key = ("per-sample", layer, beta, steps, copies, seed, sigma, precision, compile)
    return context.base(classifier, key, build, seed)


def per_sample(
    classifier: Classifier,
    context: MethodContext,
    layer: str | None = None,
    beta: float = 10.0,
    steps: int = 10,
    copies: int = 10,
    seed: int = 0,
    sigma: float = 1.0,
    precision: Precision = "auto",
    compile: bool = False,
) -> Attributor:
    """Per-Sample Bottleneck at ``layer`` (default: the registry's) with β = ``beta``/k and the mask's
    smoothing σ_s = ``sigma`` (bottleneck cells); bits per pixel. ``precision`` and ``compile``: of
    the fit's steps (:class:`readout.PerSample`)."""
    base = _per_sample_base(classifier, context, layer, beta, steps, copies, seed, sigma, precision, compile)
    return lambda images, target=None: base.explain(images, target).heatmap


def _readout_base(classifier: Classifier, context: MethodContext, bundle: str) -> SharedExplanation:
    bundle = str(bundle)
    return context.base(classifier, ("readout", bundle), lambda: context.readout(classifier, bundle))


def readout(
    classifier: Classifier, context: MethodContext, bundle: str = "checkpoints/readout-demo"
) -> Attributor:
    """Readout Bottleneck from the bundle directory (or URL) ``bundle``; bits per pixel."""
    base = _readout_base(classifier, context, bundle)
    return lambda images, target=None: base.explain(images, target).heatmap


def _relevance(base: SharedExplanation, options: dict[str, Any]) -> Attributor:
    relevance: RelevanceIBA = relevance_attributor(base.attributor, **options)

    def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return relevance.explain_from(images, base.explain(images, target)).heatmap.detach().float()

    return attribute


def relevance_per_sample(
    classifier: Classifier,
    context: MethodContext,
    layer: str | None = None,
    beta: float = 10.0,
    steps: int = 10,
    copies: int = 10,
    seed: int = 0,
    composite: str | None = None,
    canonizer: str | None = None,
    injection: str = "information",
    mask_dead: bool = False,
    sigma: float = 1.0,
    precision: Precision = "auto",
    compile: bool = False,
) -> Attributor:
    """Relevance-IBA on a Per-Sample fit (the same fit as a ``per-sample`` row with equal options)."""
    base = _per_sample_base(classifier, context, layer, beta, steps, copies, seed, sigma, precision, compile)
    options = {"composite": composite, "canonizer": canonizer, "injection": injection, "mask_dead": mask_dead}
    return _relevance(base, options)


def relevance_readout(
    classifier: Classifier,
    context: MethodContext,
    bundle: str = "checkpoints/readout-demo",
    composite: str | None = None,
    canonizer: str | None = None,
    injection: str = "information",
    mask_dead: bool = False,
) -> Attributor:
    """Relevance-IBA on the readout bundle ``bundle``."""
    base = _readout_base(classifier, context, bundle)
    options = {"composite": composite, "canonizer": canonizer, "injection": injection, "mask_dead": mask_dead}
    return _relevance(base, options)


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
        target = resolve_target(self.model, images, target)
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
    defaults = lrp_defaults(classifier.name)
    low, high = input_bounds(classifier.mean, classifier.std)
    propagator = RelevancePropagator(
        classifier.model, composite or defaults.composite, canonizer or defaults.canonizer, low, high
    ).to(classifier.mean.device)

    def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = resolve_target(classifier, images, target)
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


# ---------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Method:
    """A registry entry: the factory ``build(classifier, context, **options) -> Attributor``."""

    build: Callable[..., Attributor]
    signed: bool = False
    """Maps of both signs (symmetric colour maps; sign-invariant randomisation similarity)."""
    bundle_option: bool = False
    """Its ``bundle`` option names a readout bundle (whose files then key cached results)."""


METHODS: dict[str, Method] = {
    "per-sample": Method(per_sample),
    "readout": Method(readout, bundle_option=True),
    "relevance-per-sample": Method(relevance_per_sample, signed=True),
    "relevance-readout": Method(relevance_readout, signed=True, bundle_option=True),
    "saliency": Method(saliency),
    "integrated-gradients": Method(integrated_gradients),
    "smoothgrad": Method(smoothgrad),
    "grad-cam": Method(grad_cam),
    "guided-backprop": Method(guided_backprop),
    "guided-grad-cam": Method(guided_grad_cam),
    "occlusion": Method(occlusion),
    "lrp": Method(lrp, signed=True),
    "random": Method(random_map),
}


def method_entry(spec: MethodSpec) -> Method:
    """The registry entry of ``spec``; unknown keys and options are errors that name the row."""
    if spec.method not in METHODS:
        raise KeyError(f"row {spec.name!r}: unknown method {spec.method!r}; registered: {', '.join(METHODS)}")
    entry = METHODS[spec.method]
    accepted = list(inspect.signature(entry.build).parameters)[2:]
    unknown = sorted(set(spec.options) - set(accepted))
    if unknown:
        raise TypeError(
            f"row {spec.name!r}: method {spec.method!r} takes no option(s) {unknown}; valid: {accepted}"
        )
    return entry


def build_method(spec: MethodSpec, classifier: Classifier, context: MethodContext) -> Attributor:
    """The attributor of one config row on ``classifier``."""
    return method_entry(spec).build(classifier, context, **spec.options)


def bundle_digest(spec: MethodSpec) -> str:
    """A hash of the readout bundle a row reads ("" for rows without one): results are keyed by it."""
    if not method_entry(spec).bundle_option:
        return ""
    bundle = str(options_of(spec)["bundle"])
    digest = hashlib.sha256()
    for name in ("readout.json", "readout.safetensors"):
        try:
            with fsspec.open(f"{bundle.rstrip('/')}/{name}", "rb") as handle:
                digest.update(handle.read())
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"row {spec.name!r}: the readout bundle {bundle} lacks {name} (train one: `make demo` "
                "for synthetic-cnn, `python -m readout.fit` otherwise)"
            ) from error
    return digest.hexdigest()[:16]


def options_of(spec: MethodSpec) -> Mapping[str, Any]:
    """The row's options with the factory's defaults filled in (for reports)."""
    parameters = list(inspect.signature(method_entry(spec).build).parameters.values())[2:]
    return {p.name: spec.options.get(p.name, p.default) for p in parameters}
