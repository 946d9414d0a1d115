"""Canonizers that let zennit's rules conserve relevance through torchvision's residual and gated blocks.

In zennit, what flows backward between hooked modules is relevance itself. An operation that is not a
hooked module passes it on by its plain Jacobian, which breaks conservation in two places:

- a residual addition ``a + b`` hands the full relevance to both summands (doubling it per block);
- an elementwise scaling or gate ``s * x`` (ConvNeXt's layer scale, squeeze-and-excitation) multiplies
  it by ``s``.

zennit ships canonizers only for ResNet and VGG. The ones here do the same for the other torchvision
CNN families, in zennit's pattern (:class:`zennit.torchvision.ResNetBasicBlockCanonizer`): each
rewrites a block's ``forward`` on the instance, for as long as the canonizer is registered. A residual
addition becomes ``torch.stack([a, b], -1)`` and a :class:`zennit.layer.Sum` module (which a composite
gives a rule, ``Norm`` by default); a scaling goes through :func:`rescale`, which passes relevance to the
signal unchanged and none to the scale. The forward value is the original block's (eval mode, where
stochastic depth is the identity).

:func:`canonizers_for` picks the canonizers a model needs, :data:`PASS_TYPES` names the modules that
need the ``Pass`` rule beyond zennit's defaults, and :func:`unsupported_modules` names the modules no
rule handles, so that a caller can refuse such a model instead of returning a silently wrong map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import convnext, efficientnet, mnasnet, mobilenetv2, mobilenetv3, regnet
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import SqueezeExcitation
from zennit.canonizers import AttributeCanonizer, Canonizer, SequentialMergeBatchNorm
from zennit.core import collect_leaves
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm, Linear

#: Module types that need zennit's ``Pass`` rule on top of zennit's defaults (which already pass
#: activations and batch norms). A layer norm is an elementwise affine map of a normalised signal;
#: passing relevance through it unchanged is the usual LRP treatment. Covers torchvision's
#: ``LayerNorm2d`` (a subclass).
PASS_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


class ConstantScale(torch.autograd.Function):
    """``scale * signal`` in the forward pass; in the backward pass the scale is treated as a constant.

    The relevance reaching the product passes to the signal unchanged (an elementwise rescaling moves
    no relevance between units) and none reaches the scale (LRP's convention for a gate). The plain
    Jacobian would instead multiply the relevance by the scale and feed the rest into the gate's branch.
    """

    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        ctx.scale_shape, ctx.signal_shape = scale.shape, signal.shape
        return scale * signal

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Zeros rather than None for the scale: zennit's hooks in the gate's branch (the SE convolutions)
        # divide the relevance they receive and cannot take None.
        to_scale = relevance.new_zeros(ctx.scale_shape) if ctx.needs_input_grad[0] else None
        # A broadcast signal collects the relevance of all the units it scaled (a sum: still conserved).
        to_signal = relevance.sum_to_size(ctx.signal_shape) if ctx.needs_input_grad[1] else None
        return to_scale, to_signal


def rescale(scale: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """``scale * signal`` (shapes broadcast as in torch), with relevance passed to ``signal`` unchanged.

    scale: e.g. (B, C, 1, 1) for a squeeze-and-excitation gate, (C, 1, 1) for a layer scale;
    signal: (B, C, H, W). Returns the product, shaped like the broadcast of the two.
    """
    return ConstantScale.apply(scale, signal)


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's ``SequentialMergeBatchNorm``, with the emptied batch norm exactly the identity.

    zennit 0.5.1 folds a batch norm into the convolution before it and then sets its statistics to
    mean 0, variance 1, but leaves ``eps``: the batch norm still divides by sqrt(1 + eps). With
    EfficientNet's and MobileNetV3's eps of 1e-3 that compounds over the blocks to a change of the
    logits of about 1e-3 (relative). Variance 0.5 and eps 0.5 make the divisor exactly 1 (as zennit
    does after 0.5.1); both are restored on removal.
    """

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        """As zennit's, but only where the batch norm normalises the layer's outputs: leaves that are
        neighbours in registration order need not be neighbours in the data flow (DenseNet registers a
        layer's last convolution right before the next layer's batch norm, which reads the
        concatenation)."""
        instances: list[Canonizer] = []
        last = None
        for leaf in collect_leaves(root_module):
            if isinstance(last, self.linear_type) and isinstance(leaf, self.batch_norm_type):
                outputs = getattr(last, "out_channels", getattr(last, "out_features", None))
                if outputs == leaf.num_features:
                    instance = self.copy()
                    instance.register((last,), leaf)
                    instances.append(instance)
            last = leaf
        return instances

    def register(self, linears: Sequence[nn.Module], batch_norm: _BatchNorm) -> None:
        self.batch_norm_eps = batch_norm.eps
        super().register(linears, batch_norm)
        assert batch_norm.running_var is not None  # the merge above has read it
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 0.5)
        batch_norm.eps = 0.5

    def remove(self) -> None:
        super().remove()
        self.batch_norm.eps = self.batch_norm_eps


def add_through_sum(block: nn.Module, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first + second`` through the block's ``canonizer_sum`` module, so that the sum gets a rule.

    first, second: equal shapes, e.g. (B, C, H, W); stacked to (B, C, H, W, 2) and summed over the last
    dimension, as zennit's ResNet canonizers do.
    """
    return block.get_submodule("canonizer_sum")(torch.stack([first, second], dim=-1))


class BlockCanonizer(AttributeCanonizer):
    """Rewrites the ``forward`` of every ``block_type`` instance; adds a ``Sum`` module for its residual.

    Subclasses give ``block_type`` and a ``forward(self, input)`` (a static method taking the block as
    ``self``) that computes what the block's own forward does. A subclass of ``block_type`` whose
    forward differs is left alone: the rewrite would change what it computes.
    """

    block_type: ClassVar[type[nn.Module]]
    #: Whether the rewritten forward adds a residual through ``canonizer_sum``.
    adds_residual: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def applies_to(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a ``block_type`` that still computes ``block_type.forward``."""
        return isinstance(module, cls.block_type) and type(module).forward is cls.block_type.forward

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, Any] | None:
        if not cls.applies_to(module):
            return None
        attributes: dict[str, Any] = {"forward": cls.forward.__get__(module)}
        if cls.adds_residual:
            attributes["canonizer_sum"] = Sum()
        return attributes

    @staticmethod
    def forward(self: Any, input: torch.Tensor) -> torch.Tensor:
        """The block's forward with its additions and scalings rewritten; ``self`` is the block."""
        raise NotImplementedError

    def copy(self) -> BlockCanonizer:
        return type(self)()


class MobileNetV2Canonizer(BlockCanonizer):
    """MobileNetV2's ``InvertedResidual``: ``x + conv(x)`` when the block keeps its shape."""

    block_type = mobilenetv2.InvertedResidual

    @staticmethod
    def forward(self: mobilenetv2.InvertedResidual, input: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return add_through_sum(self, input, self.conv(input))
        return self.conv(input)


class MobileNetV3Canonizer(BlockCanonizer):
    """MobileNetV3's ``InvertedResidual``: ``block(x) + x`` when the block keeps its shape."""

    block_type = mobilenetv3.InvertedResidual

    @staticmethod
    def forward(self: mobilenetv3.InvertedResidual, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = add_through_sum(self, result, input)
        return result


class MBConvCanonizer(BlockCanonizer):
    """EfficientNet's ``MBConv``: ``stochastic_depth(block(x)) + x`` when the block keeps its shape."""

    block_type = efficientnet.MBConv

    @staticmethod
    def forward(self: efficientnet.MBConv | efficientnet.FusedMBConv, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = add_through_sum(self, self.stochastic_depth(result), input)
        return result


class FusedMBConvCanonizer(MBConvCanonizer):
    """EfficientNetV2's ``FusedMBConv``, whose forward is ``MBConv``'s."""

    block_type = efficientnet.FusedMBConv


class CNBlockCanonizer(BlockCanonizer):
    """ConvNeXt's ``CNBlock``: ``stochastic_depth(layer_scale * block(x)) + x``, the scale held constant."""

    block_type = convnext.CNBlock

    @staticmethod
    def forward(self: convnext.CNBlock, input: torch.Tensor) -> torch.Tensor:
        result = self.stochastic_depth(rescale(self.layer_scale, self.block(input)))
        return add_through_sum(self, result, input)


class SqueezeExcitationCanonizer(BlockCanonizer):
    """``torchvision.ops.SqueezeExcitation``: ``scale(x) * x``, the gate held constant (no residual)."""

    block_type = SqueezeExcitation
    adds_residual = False

    @staticmethod
    def forward(self: SqueezeExcitation, input: torch.Tensor) -> torch.Tensor:
        return rescale(self._scale(input), input)


class RegNetCanonizer(BlockCanonizer):
    """RegNet's ``ResBottleneckBlock``: ``activation(proj(x) + f(x))``, or ``activation(x + f(x))``."""

    block_type = regnet.ResBottleneckBlock

    @staticmethod
    def forward(self: regnet.ResBottleneckBlock, input: torch.Tensor) -> torch.Tensor:
        shortcut = input if self.proj is None else self.proj(input)
        return self.activation(add_through_sum(self, shortcut, self.f(input)))


class MNASNetCanonizer(BlockCanonizer):
    """MNASNet's ``_InvertedResidual``: ``layers(x) + x`` when the block keeps its shape."""

    block_type = mnasnet._InvertedResidual

    @staticmethod
    def forward(self: mnasnet._InvertedResidual, input: torch.Tensor) -> torch.Tensor:
        if self.apply_residual:
            return add_through_sum(self, self.layers(input), input)
        return self.layers(input)


#: The block canonizers of this module, in the order :func:`canonizers_for` returns them.
BLOCK_CANONIZERS: tuple[type[BlockCanonizer], ...] = (
    MobileNetV2Canonizer,
    MobileNetV3Canonizer,
    MBConvCanonizer,
    FusedMBConvCanonizer,
    CNBlockCanonizer,
    SqueezeExcitationCanonizer,
    RegNetCanonizer,
    MNASNetCanonizer,
)

#: zennit's own block canonizers, by the block type they rewrite (zennit matches by isinstance).
ZENNIT_BLOCK_CANONIZERS: tuple[tuple[type[nn.Module], Callable[[], Canonizer]], ...] = (
    (Bottleneck, ResNetBottleneckCanonizer),
    (BasicBlock, ResNetBasicBlockCanonizer),
)


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """Fresh canonizers for the blocks in ``model``: the batch-norm merge first, then one per block type.

    :class:`ExactMergeBatchNorm` always (zennit's ``SequentialMergeBatchNorm``: it merges a batch norm
    into the convolution or linear leaf right before it, and touches nothing else), then zennit's
    ResNet canonizers, then those of :data:`BLOCK_CANONIZERS`, each only if ``model`` holds its block;
    always in that order. Fresh instances: zennit canonizers hold the state they undo, so they are not
    shared between composites.
    """
    modules = list(model.modules())
    canonizers: list[Canonizer] = [ExactMergeBatchNorm()]
    for block_type, make in ZENNIT_BLOCK_CANONIZERS:
        if any(isinstance(module, block_type) for module in modules):
            canonizers.append(make())
    for canonizer in BLOCK_CANONIZERS:
        if any(canonizer.applies_to(module) for module in modules):
            canonizers.append(canonizer())
    return canonizers


#: Parameter-owning module types that a rule handles: linear ones (z+, epsilon, flat: zennit.types'
#: Linear includes convolutions), batch norms (merged, or passed) and the types of PASS_TYPES.
_RULED_TYPES = (Linear, BatchNorm, *PASS_TYPES)


def _unsupported(module: nn.Module) -> bool:
    # zennit's Activation type lists MultiheadAttention, so its composites would silently Pass it.
    if isinstance(module, nn.MultiheadAttention):
        return True
    owns_parameters = next(module.parameters(recurse=False), None) is not None
    handled = isinstance(module, _RULED_TYPES) or any(c.applies_to(module) for c in BLOCK_CANONIZERS)
    return owns_parameters and not handled


def unsupported_modules(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Names, with types, of the modules no rule handles: ``"encoder.attention (MultiheadAttention)"``.

    modules: (name, module) pairs, as ``model.named_modules()`` gives them. A module is unsupported if it
    owns parameters directly and is neither a linear module, a batch norm, one of :data:`PASS_TYPES`, nor
    a block one of :data:`BLOCK_CANONIZERS` rewrites; and every ``nn.MultiheadAttention``. The root
    module (name ``""``) is named ``<root>``. Empty for every family this module canonizes.
    """
    return [
        f"{name or '<root>'} ({type(module).__name__})" for name, module in modules if _unsupported(module)
    ]
