"""Canonizers of torchvision's residual and gated blocks: the forward is the block's, relevance is conserved.

Models are torchvision's, with random weights (``weights=None``), in eval mode, on 64 px inputs. Their
default initialisation makes every batch norm the identity and ConvNeXt's layer scale 1e-6, which would
leave the batch-norm merge and the layer-scale path untested; ``randomise`` changes both (batch-norm
shifts only where said: they give the merged convolutions biases, see ``randomise``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.types import Convolution

from readout.canonizers import (
    BLOCK_CANONIZERS,
    PASS_TYPES,
    ExactMergeBatchNorm,
    SqueezeExcitationCanonizer,
    canonizers_for,
    rescale,
    unsupported_modules,
)
from readout.lrp import ZPlusFallback

#: Per model: the prefix whose output gets the relevance (the first residual and gated blocks included).
PREFIXES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "mobilenet_v2": lambda m: m.features[:4],
    "mobilenet_v3_small": lambda m: m.features[:4],
    "efficientnet_b0": lambda m: m.features[:4],
    "efficientnet_v2_s": lambda m: m.features[:3],  # the FusedMBConv stages
    "convnext_tiny": lambda m: m.features[:4],
    "regnet_y_400mf": lambda m: nn.Sequential(m.stem, *m.trunk_output[:2]),
    "mnasnet0_5": lambda m: m.layers[:10],
    "resnet18": lambda m: nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2),
}
MODELS = list(PREFIXES)

#: What the forward test runs, where not the whole model: efficientnet_v2_s's later stages are MBConv, as
#: in efficientnet_b0, and would cost seconds on a CPU.
FORWARD_PART: dict[str, Callable[[nn.Module], nn.Module]] = {
    "efficientnet_v2_s": PREFIXES["efficientnet_v2_s"]
}

#: The two composites of the conservation table: EpsilonPlusFlat (z+ for the convolutions after the first)
#: and the same with readout's ZPlusFallback for them.
COMPOSITES: dict[str, Callable[[nn.Module], Composite]] = {
    "EpsilonPlusFlat": lambda m: EpsilonPlusFlat(
        zero_params=["bias"], canonizers=canonizers_for(m), layer_map=[(PASS_TYPES, Pass())]
    ),
    "ZPlusFallback": lambda m: EpsilonPlusFlat(
        zero_params=["bias"],
        canonizers=canonizers_for(m),
        layer_map=[(PASS_TYPES, Pass()), (Convolution, ZPlusFallback(zero_params=["bias"]))],
    ),
}


def randomise(model: nn.Module, shift: bool) -> nn.Module:
    """Random batch-norm statistics and affine scales, and random ConvNeXt layer scales, in place.

    ``shift``: random running means and biases too. Then the merged convolutions get biases, which turn
    whole depthwise channels into bias-only units that z+ cannot conserve (see the conservation test).
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            if shift:
                module.running_mean.uniform_(-0.5, 0.5)
                module.bias.data.uniform_(-0.3, 0.3)
        if isinstance(module, torchvision.models.convnext.CNBlock):
            module.layer_scale.data.uniform_(0.5, 1.5)
    return model


Models = dict[tuple[str, bool], nn.Module]


@pytest.fixture(scope="module")
def models() -> Models:
    """Built models by (name, shift), each built once per module; tests deep-copy what they change."""
    return {}


def model(models: Models, name: str, shift: bool = False) -> nn.Module:
    """torchvision's ``name`` with seeded random weights, randomised (see ``randomise``), in eval mode."""
    if (name, shift) not in models:
        torch.manual_seed(0)
        built = torchvision.models.get_model(name, weights=None, num_classes=6).eval()
        models[name, shift] = randomise(built, shift).requires_grad_(False)
    return models[name, shift]


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def conservation(prefix: nn.Module, composite: Composite) -> torch.Tensor:
    """Per image (2,): input relevance / injected relevance, for relevance ``output.clamp(min=0)``."""
    prefix = copy.deepcopy(prefix)
    output, relevance = Gradient(prefix, composite)(
        images().requires_grad_(True), lambda out: out.clamp(min=0)
    )
    return relevance.sum((1, 2, 3)) / output.clamp(min=0).sum((1, 2, 3))


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("name", MODELS)
def test_canonized_forward_equals_the_model_and_removal_restores_it(models, name):
    net = copy.deepcopy(FORWARD_PART.get(name, lambda m: m)(model(models, name, shift=True)))
    x = images()
    state = {key: value.clone() for key, value in net.state_dict().items()}
    expected = net(x)

    instances = [instance for canonizer in canonizers_for(net) for instance in canonizer.apply(net)]
    assert all(callable(instance.remove) for instance in instances)
    rewritten = [m for m in net.modules() if "forward" in vars(m)]
    assert rewritten, "no block was canonized"
    assert len([m for m in net.modules() if isinstance(m, Sum)]) > 0
    # The batch-norm merge reorders float operations: equal up to rounding, relative to the output's scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4 * scale)

    for instance in instances:
        instance.remove()
    assert not [m for m in net.modules() if "forward" in vars(m) or isinstance(m, Sum)]
    assert net.state_dict().keys() == state.keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(net(x), expected)


@pytest.mark.parametrize("name", MODELS)
def test_composite_context_leaves_no_hooks_nor_rewrites(models, name):
    net = copy.deepcopy(PREFIXES[name](model(models, name)))
    expected = net(images())
    composite = COMPOSITES["EpsilonPlusFlat"](net)
    with composite.context(net):
        assert hook_count(net) > 0
    assert hook_count(net) == 0
    assert not [m for m in net.modules() if "forward" in vars(m) or isinstance(m, Sum)]
    assert torch.equal(net(images()), expected)


# efficientnet_b0's random-weight activations shrink to ~1e-5 by features[3] (SE gates near 1/2), where
# zennit's absolute stabilizer (1e-6, in z+ and in the Sum's Norm rule) keeps back ~12% of the
# relevance: 0.877 per image. ZPlusFallback gets back half of it (0.938); with a stabilizer of 1e-9,
# z+ gives 0.987 (test_efficientnet_conserves_with_a_stabilizer_below_its_scale).
EFFICIENTNET_B0_Z_PLUS = pytest.mark.xfail(
    strict=True, reason="activations ~1e-5 against zennit's 1e-6 stabilizer: 0.87 (see comment)"
)


@pytest.mark.parametrize(
    ("name", "composite"),
    [
        pytest.param(name, composite, marks=EFFICIENTNET_B0_Z_PLUS)
        if (name, composite) == ("efficientnet_b0", "EpsilonPlusFlat")
        else (name, composite)
        for name in MODELS
        for composite in COMPOSITES
    ],
)
def test_relevance_at_a_feature_layer_is_conserved_to_the_input(models, name, composite):
    prefix = PREFIXES[name](model(models, name))
    ratio = conservation(prefix, COMPOSITES[composite](prefix))
    print(f"\nconservation {name:20s} {composite:16s} {[round(r, 4) for r in ratio.tolist()]}")
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio.tolist()


def test_efficientnet_conserves_with_a_stabilizer_below_its_scale(models):
    prefix = PREFIXES["efficientnet_b0"](model(models, "efficientnet_b0"))
    composite = EpsilonPlusFlat(
        epsilon=1e-9,
        stabilizer=1e-9,
        zero_params=["bias"],
        canonizers=canonizers_for(prefix),
        layer_map=[(PASS_TYPES, Pass())],
    )
    ratio = conservation(prefix, composite)
    print(f"\nconservation efficientnet_b0 EpsilonPlusFlat, stabilizer 1e-9: {ratio.tolist()}")
    assert ((ratio > 0.98) & (ratio < 1.02)).all(), ratio.tolist()


@pytest.mark.parametrize("name", MODELS)
def test_without_the_block_canonizers_relevance_is_not_conserved(models, name):
    """The conservation test has teeth: the plain Jacobian of ``a + b`` and ``s * x`` breaks it."""
    prefix = PREFIXES[name](model(models, name))
    composite = EpsilonPlusFlat(
        zero_params=["bias"], canonizers=[ExactMergeBatchNorm()], layer_map=[(PASS_TYPES, Pass())]
    )
    ratio = conservation(prefix, composite)
    print(f"\nwithout block canonizers {name:20s} {[round(r, 4) for r in ratio.tolist()]}")
    assert ((ratio < 0.9) | (ratio > 1.1)).all(), ratio.tolist()


def test_merged_batch_norm_is_exactly_the_identity_and_comes_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3))
    net = randomise(net, shift=True).eval().double()
    x = images().double()
    expected = net(x)
    (zennits,) = SequentialMergeBatchNorm().apply(net)
    drift = ((net(x) - expected).abs().max() / expected.abs().max()).item()
    zennits.remove()
    assert drift > 4e-4, "zennit's merge leaves a factor 1 / sqrt(1 + eps): 5e-4 here"

    (instance,) = ExactMergeBatchNorm().apply(net)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    instance.remove()
    assert net[1].eps == 1e-3 and net[0].bias is None
    assert torch.equal(net(x), expected)


def test_rescale_is_the_product_and_passes_relevance_to_the_signal_only():
    scale = torch.rand(2, 3, 1, 1, requires_grad=True)
    signal = torch.randn(2, 3, 4, 4, requires_grad=True)
    relevance = torch.randn(2, 3, 4, 4)
    product = rescale(scale, signal)
    assert torch.equal(product, scale * signal)
    product.backward(relevance)
    assert torch.equal(signal.grad, relevance)
    assert torch.equal(scale.grad, torch.zeros_like(scale))

    broadcast = torch.randn(1, 3, 1, 1, requires_grad=True)
    rescale(torch.rand(2, 3, 4, 4), broadcast).backward(relevance)
    torch.testing.assert_close(broadcast.grad, relevance.sum((0, 2, 3), keepdim=True))


def test_canonizers_for_gives_fresh_instances_in_a_fixed_order(models):
    net = model(models, "regnet_y_400mf")
    first, second = canonizers_for(net), canonizers_for(net)
    names = [type(c).__name__ for c in first]
    assert names == ["ExactMergeBatchNorm", "SqueezeExcitationCanonizer", "RegNetCanonizer"]
    assert names == [type(c).__name__ for c in second]
    assert not {id(c) for c in first} & {id(c) for c in second}
    assert [type(c).__name__ for c in canonizers_for(nn.Conv2d(3, 3, 1))] == ["ExactMergeBatchNorm"]
    order = [c for c in BLOCK_CANONIZERS if any(isinstance(x, c) for x in first)]
    assert [type(c) for c in first[1:]] == order


def test_a_block_subclass_with_its_own_forward_is_left_alone():
    class Ungated(torchvision.ops.SqueezeExcitation):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return input

    class Renamed(torchvision.ops.SqueezeExcitation):
        pass

    assert not SqueezeExcitationCanonizer.applies_to(Ungated(4, 2))
    assert SqueezeExcitationCanonizer.applies_to(Renamed(4, 2))


def test_unsupported_modules_names_attention_and_nothing_in_the_cnns(models):
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8, num_classes=3
    )
    unsupported = unsupported_modules(vit.named_modules())
    assert "encoder.layers.encoder_layer_0.self_attention (MultiheadAttention)" in unsupported
    # The class token and the position embedding are parameters no rule sees either.
    assert unsupported == [
        "<root> (VisionTransformer)",
        "encoder (Encoder)",
        "encoder.layers.encoder_layer_0.self_attention (MultiheadAttention)",
    ]
    for name in MODELS:
        assert unsupported_modules(model(models, name).named_modules()) == [], name
