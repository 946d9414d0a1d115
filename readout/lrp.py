"""Layer-wise relevance propagation through the layers before a tap: a thin layer over zennit.

Relevance given at a layer's output (any shape, any units) is propagated back to the model's input
with a zennit composite; the input relevance sums to the output relevance when the rules conserve it.
The layer is any module of the model (``layer=``, a module path): the model runs up to it, and the
relevance flows back from there.

Two things make that hold here:

- Canonizers merge batch norm into the preceding convolution and turn a residual addition into a
  ``Sum`` module with its own rule (zennit's ``ResNetCanonizer``, ``VGGCanonizer``; for any other
  model ``auto``, chosen from the module types found: :func:`readout.canonizers.canonizers_for`).
  Without them the gradient of ``out + identity`` hands the full relevance to both branches
  (doubling it per block), and a gate ``s · x`` scales it by s.
- Biases would absorb relevance (the batch-norm merge creates them). Every rule gets
  ``zero_params=["bias"]``: the redistribution ignores biases, while the forward pass, and so every
  activation and every dead unit, stays that of the real network.

One loss remains under z+ (the convolutions of EpsilonPlusFlat, the default), and it is z+'s own:
z+ passes a unit's relevance only along its positive contributions, so a unit without any drops it.
Where a ReLU follows, such a unit is dead and the rules above give it none, but a ResNet's projection shortcut
(``downsample``: 1x1 convolution and batch norm) enters the residual sum unrectified, and the sum's
``Norm`` rule hands it relevance by its signed output, so single maps stray from exact conservation
behind such a shortcut (every other layer, the stem's zero padding included, conserves).
``EpsilonPlusFlatZPlusFallback`` (:class:`ZPlusFallback`) passes that relevance along the negative
contributions instead and conserves, with maps otherwise the same. The measured per-image figures:
docs/relevance.md.

Every composite also gives LayerNorm zennit's ``Pass`` (as batch norm without a convolution before
it gets): the relevance passes it unchanged. A module that no rule handles (one that owns parameters
and is no convolution, linear layer or normalisation, or an attention) is refused by name.

The rules for the first layer (Flat, ZBox) go to the first linear module that zennit's own
``SpecialFirstLayerMapComposite`` meets in ``named_modules`` order (:func:`first_layer` says which).
The module is deep-copied once, with in-place ReLUs made out-of-place: the caller's classifier is
never touched, and hooks and canonizers live only while :meth:`RelevancePropagator.forward` runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
)
from zennit.core import BasicHook, Composite, Stabilizer
from zennit.layer import Sum
from zennit.rules import ClampMod, NoMod, Pass, zero_bias
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

from readout.canonizers import PASS_TYPES, canonizers_for, unsupported_modules
from readout.classifier import Classifier, LrpDefaults, out_of_place

#: Parameters the rules treat as zero while redistributing relevance (never in the forward pass).
ZERO_PARAMS = ["bias"]


class SumPlus(BasicHook):
    """Rule for the residual ``Sum`` of canonized blocks: R_i = x_i⁺ / Σ_k x_k⁺ · R (summands i, k).

    zennit's default for ``Sum`` (``Norm``) splits by the signed summands, x_i / Σ_k x_k · R: where the
    identity and the residual branch nearly cancel, it hands out large relevance of both signs (single
    pixels then dominate the map). Splitting by the positive parts keeps every share in [0, 1]; it
    loses the relevance of units whose summands are all ≤ 0, which are dead after the block's ReLU.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        stabilizer_fn = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda input: input.clamp(min=0)],
            param_modifiers=[NoMod(param_keys=[])],
            output_modifiers=[lambda output: output],
            gradient_mapper=lambda out_grad, outputs: out_grad / stabilizer_fn(outputs[0]),
            reducer=lambda inputs, gradients: inputs[0] * gradients[0],
        )


class ZPlusFallback(BasicHook):
    """z+ for a linear module, with the relevance z+ keeps back passed along the negative contributions.

    With contributions c_ij = x_i w_ij (biases left out), z_j⁺ = Σ_i max(c_ij, 0), z_j⁻ = Σ_i min(c_ij, 0),
    z+ hands out R_j · max(c_ij, 0) / (z_j⁺ + ε) and keeps back R_j · ε / (z_j⁺ + ε): all of R_j on a
    unit without positive contributions. That share goes along the negative ones:

        R_i = Σ_j R_j · [max(c_ij, 0) / (z_j⁺ + ε) + ε / (z_j⁺ + ε) · min(c_ij, 0) / (z_j⁻ − ε)]

    Every share is ≥ 0 and a unit's shares sum to 1 up to ε / |z_j⁻|; where z_j⁺ ≫ ε this is z+ (to
    ε / z_j⁺). Units without positive contributions get relevance at a ResNet's projection shortcut,
    which enters the residual sum unrectified (see the module docstring). Biases are always left out:
    the rule conserves only without them.
    """

    def __init__(self, stabilizer: float = 1e-6, zero_params: list[str] | None = None) -> None:
        epsilon = stabilizer
        stabilizer_fn = Stabilizer.ensure(stabilizer)
        no_bias = zero_bias(zero_params)
        positive, negative = ClampMod(min=0.0, zero_params=no_bias), ClampMod(max=0.0, zero_params=no_bias)

        def gradient_mapper(out_grad: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
            z_plus, z_minus = outputs[0] + outputs[1], outputs[2] + outputs[3]
            to_plus = out_grad / (z_plus + epsilon)
            to_minus = to_plus * epsilon / stabilizer_fn(z_minus)
            return [to_plus, to_plus, to_minus, to_minus]

        super().__init__(
            # (x⁺, w⁺) and (x⁻, w⁻) give the positive contributions, (x⁺, w⁻) and (x⁻, w⁺) the negative ones.
            input_modifiers=[
                lambda input: input.clamp(min=0),
                lambda input: input.clamp(max=0),
                lambda input: input.clamp(min=0),
                lambda input: input.clamp(max=0),
            ],
            param_modifiers=[positive, negative, negative, positive],
            output_modifiers=[lambda output: output] * 4,
            gradient_mapper=gradient_mapper,
            reducer=lambda inputs, gradients: sum(x * g for x, g in zip(inputs, gradients, strict=True)),
        )


#: A composite from the input bounds (low, high: (1, 3, 1, 1), normalised units), the canonizers and the
#: layer map put before the composite's own.
CompositeFactory = Callable[[torch.Tensor, torch.Tensor, list[Canonizer], list], Composite]

COMPOSITES: dict[str, CompositeFactory] = {
    "EpsilonPlusFlat": lambda low, high, canonizers, extra: EpsilonPlusFlat(
        zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=extra
    ),
    "EpsilonPlusFlatSumPlus": lambda low, high, canonizers, extra: EpsilonPlusFlat(
        zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=[*extra, (Sum, SumPlus())]
    ),
    "EpsilonPlusFlatZPlusFallback": lambda low, high, canonizers, extra: EpsilonPlusFlat(
        zero_params=ZERO_PARAMS,
        canonizers=canonizers,
        layer_map=[*extra, (Convolution, ZPlusFallback(zero_params=ZERO_PARAMS))],
    ),
    "EpsilonPlus": lambda low, high, canonizers, extra: EpsilonPlus(
        zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=extra
    ),
    "EpsilonGammaBox": lambda low, high, canonizers, extra: EpsilonGammaBox(
        low=low, high=high, zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=extra
    ),
    "EpsilonAlpha2Beta1": lambda low, high, canonizers, extra: EpsilonAlpha2Beta1(
        zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=extra
    ),
    "EpsilonAlpha2Beta1Flat": lambda low, high, canonizers, extra: EpsilonAlpha2Beta1Flat(
        zero_params=ZERO_PARAMS, canonizers=canonizers, layer_map=extra
    ),
}
"""Composites by name (the config value); each rule ignores biases (``ZERO_PARAMS``). ``...SumPlus``:
the residual sums get :class:`SumPlus` instead of zennit's ``Norm``; ``...ZPlusFallback``: the convolutions
after the first get :class:`ZPlusFallback` instead of z+."""

CANONIZERS: dict[str, Callable[[nn.Module], list[Canonizer]]] = {
    "resnet": lambda model: [ResNetCanonizer()],
    "vgg": lambda model: [VGGCanonizer()],
    "auto": canonizers_for,
    "none": lambda model: [],
}
"""Canonizers by name, for a model: fresh instances per call (zennit canonizers hold the state they undo)."""


#: Any other model: canonizers from its module types, and z+ with the fallback for the relevance z+
#: would drop at units without positive contributions (which unrectified residual branches and the
#: linear bottlenecks of inverted residuals have).
AUTO = LrpDefaults("EpsilonPlusFlatZPlusFallback", "auto")


def lrp_defaults(classifier: Classifier) -> LrpDefaults:
    """The classifier's own LRP rules where the registry chose them by hand
    (``classifier.chosen_lrp``, :mod:`readout.backbones`), else :data:`AUTO`."""
    return classifier.chosen_lrp or AUTO


def make_composite(
    name: str, canonizer: str, low: torch.Tensor, high: torch.Tensor, model: nn.Module | None = None
) -> Composite:
    """A fresh composite ``name`` with the canonizers ``canonizer`` for ``model``; unknown names list
    the valid ones."""
    if name not in COMPOSITES:
        raise KeyError(f"unknown composite {name!r}; registered: {', '.join(COMPOSITES)}")
    if canonizer not in CANONIZERS:
        raise KeyError(f"unknown canonizer {canonizer!r}; registered: {', '.join(CANONIZERS)}")
    canonizers = CANONIZERS[canonizer](model if model is not None else nn.Identity())
    return COMPOSITES[name](low, high, canonizers, [(PASS_TYPES, Pass())])


def input_bounds(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of normalised images for the ZBox rule: ((0 − mean)/std, (1 − mean)/std), (1, C, 1, 1) each."""
    mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def first_layer(composite: Composite, module: nn.Module) -> str | None:
    """Name (in ``module.named_modules()``) of the module that gets the composite's first-layer rule.

    Asks the composite's own mapping, in the order zennit registers hooks; None for composites
    without a first-layer rule.
    """
    if not isinstance(composite, SpecialFirstLayerMapComposite):
        return None
    first_hooks = [hook for _, hook in composite.first_map]
    ctx: dict = {}
    for name, child in module.named_modules():
        hook = composite.module_map(ctx, name, child)
        if any(hook is first for first in first_hooks):
            return name
    return None


class _Stop(Exception):
    """Ends the forward pass once the layer's output is known."""


class RelevancePropagator(nn.Module):
    """``propagator(inputs, relevance) -> (output, input relevance)`` through a private copy of ``module``.

    inputs: what ``module`` takes (here the normalised images, (B, 3, H, W)); relevance: the relevance at
    the output of the submodule ``layer`` (a module path; None: the module's own output), shaped like
    that output (here (B, C, h, w)). The input relevance has the shape of ``inputs``. The copy stays in
    eval mode and never requires gradients; the layers after ``layer`` do not run.
    """

    low: torch.Tensor
    high: torch.Tensor

    def __init__(
        self,
        module: nn.Module,
        composite: str,
        canonizer: str,
        low: torch.Tensor,
        high: torch.Tensor,
        layer: str | None = None,
    ) -> None:
        super().__init__()
        make_composite(composite, canonizer, low, high)  # fail at construction on unknown names
        self.composite_name, self.canonizer_name = composite, canonizer
        self.module = copy.deepcopy(module)
        self.layer = layer or ""
        out_of_place(self.module)
        self.module.requires_grad_(False)
        self.register_buffer("low", low.detach().clone(), persistent=False)
        self.register_buffer("high", high.detach().clone(), persistent=False)
        super().train(False)
        unsupported = unsupported_modules(self.module.named_modules())
        if unsupported:
            raise ValueError(
                f"no LRP rule fits {', '.join(unsupported)}: Relevance-IBA propagates through "
                "convolutions, linear layers, normalisations, activations, pooling and the residual "
                "blocks of readout.canonizers"
            )

    def train(self, mode: bool = True) -> RelevancePropagator:
        return super().train(False)

    def composite(self) -> Composite:
        """A fresh composite (zennit composites are registered to one module at a time)."""
        return make_composite(self.composite_name, self.canonizer_name, self.low, self.high, self.module)

    def first_layer(self) -> str | None:
        """Name of the module in ``self.module`` that gets the first-layer rule (see :func:`first_layer`)."""
        return first_layer(self.composite(), self.module)

    def forward(self, inputs: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.detach().requires_grad_(True)
        captured: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured.append(output)
            raise _Stop

        with torch.enable_grad(), self.composite().context(self.module) as model:
            # Registered after the composite's hooks, so the output captured is the one they wrap.
            handle = model.get_submodule(self.layer).register_forward_hook(capture)
            try:
                model(inputs)
            except _Stop:
                pass
            finally:
                handle.remove()
            (output,) = captured
            (input_relevance,) = torch.autograd.grad(output, inputs, grad_outputs=relevance.detach())
        return output.detach(), input_relevance.detach()
