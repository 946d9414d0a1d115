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
``readout``                       Readout Bottleneck from a bundle (:mod:`readout.bundle`)     (none)
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

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from readout.attributor import BottleneckAttributor
from readout.classifier import Classifier
from readout.evaluation.baselines import (
    grad_cam,
    guided_backprop,
    guided_grad_cam,
    integrated_gradients,
    lrp,
    occlusion,
    random_map,
    saliency,
    smoothgrad,
)
from readout.evaluation.context import Attributor, MethodContext, MethodSpec
from readout.per_sample import PerSample
from readout.precision import Precision
from readout.relevance import RelevanceIBA, relevance_attributor

# ---------------------------------------------------------------------------------------------------------
# Information Bottleneck methods
#
# Each is an attributor factory, ``(classifier, context, **options) -> attributor object`` (what
# readout.explain runs); :func:`row` makes the evaluation's row of it, with the same options.


def per_sample_attributor(
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
) -> BottleneckAttributor:
    """Per-Sample Bottleneck at ``layer`` (default: the registry's) with β = ``beta``/k and the mask's
    smoothing σ_s = ``sigma`` (bottleneck cells); bits per pixel. ``precision`` and ``compile``: of
    the fit's steps (:class:`readout.PerSample`). Rows with equal options share one fit."""

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
    return context.base(classifier, key, build, seed).attributor


def readout_attributor(
    classifier: Classifier | None, context: MethodContext, bundle: str = "checkpoints/readout-demo"
) -> BottleneckAttributor:
    """Readout Bottleneck from the bundle directory (or URL) ``bundle``, on ``classifier`` (None: the
    classifier the bundle names); bits per pixel."""
    bundle = str(bundle)
    if classifier is None:
        return context.readout(None, bundle)
    return context.base(
        classifier, ("readout", bundle), lambda: context.readout(classifier, bundle)
    ).attributor


def relevance_per_sample_attributor(
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
) -> RelevanceIBA:
    """Relevance-IBA on a Per-Sample fit (the same fit as a ``per-sample`` row with equal options)."""
    base = per_sample_attributor(
        classifier, context, layer, beta, steps, copies, seed, sigma, precision, compile
    )
    options = {"composite": composite, "canonizer": canonizer, "injection": injection, "mask_dead": mask_dead}
    return relevance_attributor(base, **options)


def relevance_readout_attributor(
    classifier: Classifier | None,
    context: MethodContext,
    bundle: str = "checkpoints/readout-demo",
    composite: str | None = None,
    canonizer: str | None = None,
    injection: str = "information",
    mask_dead: bool = False,
) -> RelevanceIBA:
    """Relevance-IBA on the readout bundle ``bundle``."""
    options = {"composite": composite, "canonizer": canonizer, "injection": injection, "mask_dead": mask_dead}
    return relevance_attributor(readout_attributor(classifier, context, bundle), **options)


def row(factory: Callable[..., BottleneckAttributor | RelevanceIBA]) -> Callable[..., Attributor]:
    """The evaluation row of an attributor factory, taking the factory's options (its signature, by
    ``functools.wraps``): the heatmap of each batch, from one fit per batch for every row on the same
    bottleneck (:meth:`MethodContext.shared`); Relevance-IBA propagates that fit's information."""

    @functools.wraps(factory)
    def build(classifier: Classifier, context: MethodContext, **options: Any) -> Attributor:
        made = factory(classifier, context, **options)
        if isinstance(made, RelevanceIBA):
            relevance, fitted = made, context.shared(made.base)

            def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
                return relevance.explain_from(images, fitted.explain(images, target)).heatmap.detach().float()

            return attribute
        shared = context.shared(made)
        return lambda images, target=None: shared.explain(images, target).heatmap

    return build


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
    estimates: bool = False
    """Building it estimates μ/σ over data (summed over ranks, so every rank builds it at once)."""
    attributor: Callable[..., BottleneckAttributor | RelevanceIBA] | None = None
    """The method as an attributor object, from the same options (``readout.explain`` runs these)."""

    @property
    def options(self) -> list[inspect.Parameter]:
        """The options its factory takes (after the classifier and the context), with their defaults."""
        return list(inspect.signature(self.build).parameters.values())[2:]


METHODS: dict[str, Method] = {
    "per-sample": Method(row(per_sample_attributor), estimates=True, attributor=per_sample_attributor),
    "readout": Method(row(readout_attributor), bundle_option=True, attributor=readout_attributor),
    "relevance-per-sample": Method(
        row(relevance_per_sample_attributor),
        signed=True,
        estimates=True,
        attributor=relevance_per_sample_attributor,
    ),
    "relevance-readout": Method(
        row(relevance_readout_attributor),
        signed=True,
        bundle_option=True,
        attributor=relevance_readout_attributor,
    ),
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
    accepted = [option.name for option in entry.options]
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
    return {p.name: spec.options.get(p.name, p.default) for p in method_entry(spec).options}
