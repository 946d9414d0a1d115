import pytest
import torch
from helpers import randomised_classifier
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.rules import ZPlus
from zennit.types import Convolution

from readout.classifier import Classifier
from readout.lrp import (
    COMPOSITES,
    RelevancePropagator,
    ZPlusFallback,
    input_bounds,
    lrp_defaults,
    make_composite,
)
from readout.taps import FeatureTaps, hook_count


def propagator_for(classifier: Classifier, layer: str = "block1", **names: str) -> RelevancePropagator:
    low, high = input_bounds(classifier.mean, classifier.std)
    options = {"composite": "EpsilonPlusFlat", "canonizer": "resnet"} | names
    return RelevancePropagator(
        classifier.model, layer=classifier.resolve(layer), low=low, high=high, **options
    )


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return randomised_classifier()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_output_equals_the_tap_in_the_full_model(classifier, images):
    propagator = propagator_for(classifier)
    features = torch.rand(2, 32, 32, 32)
    with FeatureTaps(classifier, ["block1"]) as taps:
        classifier(images)
    output, _ = propagator(classifier.normalize(images), features)
    # The batch-norm merge reorders float operations: equal up to rounding.
    torch.testing.assert_close(output, taps.features["block1"], rtol=1e-4, atol=1e-4)


def test_classifier_is_unchanged_after_a_pass(classifier, images):
    before = {name: value.clone() for name, value in classifier.state_dict().items()}
    logits = classifier(images)
    inplace = [m.inplace for m in classifier.modules() if isinstance(m, nn.ReLU)]
    propagator = propagator_for(classifier)
    propagator(classifier.normalize(images), torch.rand(2, 32, 32, 32))
    assert hook_count(classifier) == 0 and hook_count(propagator) == 0
    assert [m.inplace for m in classifier.modules() if isinstance(m, nn.ReLU)] == inplace
    for name, value in classifier.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(classifier(images), logits)
    assert not any(p.requires_grad for p in classifier.parameters())


def test_conserves_relevance_with_the_resnet_canonizer(classifier, images):
    relevance = torch.rand(2, 32, 32, 32)
    _, input_relevance = propagator_for(classifier)(classifier.normalize(images), relevance)
    ratio = input_relevance.sum((1, 2, 3)) / relevance.sum((1, 2, 3))
    torch.testing.assert_close(ratio, torch.ones(2), rtol=0, atol=1e-3)


def test_without_the_canonizer_the_residual_sum_breaks_conservation(classifier, images):
    # Negative control: the gradient of `out + identity` gives the full relevance to both branches.
    relevance = torch.rand(2, 32, 32, 32)
    _, input_relevance = propagator_for(classifier, canonizer="none")(classifier.normalize(images), relevance)
    ratio = input_relevance.sum((1, 2, 3)) / relevance.sum((1, 2, 3))
    assert ((ratio - 1).abs() > 0.1).all(), ratio


def test_first_layer_rule_goes_to_the_stem_convolution(classifier):
    propagator = propagator_for(classifier)
    name = propagator.first_layer()
    assert name == "conv1" and isinstance(propagator.module.conv1, nn.Conv2d)
    assert propagator_for(classifier, composite="EpsilonAlpha2Beta1").first_layer() is None


def test_relevance_in_a_box_lands_in_its_input_region(classifier, images):
    # block1 has stride 2; a unit at row y sees input rows 2y - 5 .. 2y + 5 (stem 3x3/2, two 3x3 convs).
    relevance = torch.zeros(2, 32, 32, 32)
    relevance[:, :, 8:14, 18:26] = torch.rand(2, 32, 6, 8)
    _, input_relevance = propagator_for(classifier)(classifier.normalize(images), relevance)
    positive = input_relevance.sum(1).clamp(min=0)
    field = torch.zeros(64, 64, dtype=torch.bool)
    field[2 * 8 - 5 : 2 * 13 + 6, 2 * 18 - 5 : 2 * 25 + 6] = True
    share = (positive * field).sum((1, 2)) / positive.sum((1, 2))
    assert (share > 0.99).all(), share
    box = torch.zeros(64, 64, dtype=torch.bool)
    box[16:28, 36:52] = True
    share_box = (positive * box).sum((1, 2)) / positive.sum((1, 2))
    assert (share_box > 0.5).all(), share_box


def test_rules_ignore_biases_the_slow_obvious_way():
    # One linear layer under the Epsilon rule: R_i = Σ_j x_i w_ji R_j / (z_j + ε sign z_j), z_j = Σ_i x_i w_ji
    # (the bias left out), ε = 1e-6.
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    layer.bias.data.fill_(2.0)
    x, relevance = torch.randn(4, 5), torch.rand(4, 3)
    propagator = RelevancePropagator(
        nn.Sequential(layer), "EpsilonPlus", "none", torch.zeros(1, 5), torch.ones(1, 5)
    )
    _, got = propagator(x, relevance)
    contributions = x[:, None, :] * layer.weight[None]  # (B, out, in)
    z = contributions.sum(2, keepdim=True)
    z = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
    expected = (contributions / z * relevance[..., None]).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(KeyError, match="EpsilonPlusFlat"):
        make_composite("EpsilonPlusFlatt", "resnet", torch.zeros(1), torch.ones(1))
    with pytest.raises(KeyError, match="resnet"):
        make_composite("EpsilonPlusFlat", "resnett", torch.zeros(1), torch.ones(1))


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_every_composite_runs_and_keeps_the_total_close(classifier, images, name):
    # On live units only: SumPlus drops relevance put on units that are dead after the block's ReLU.
    relevance = torch.rand(1, 32, 32, 32) * (
        classifier.split("block1").features(classifier.normalize(images[:1])) > 0
    )
    _, input_relevance = propagator_for(classifier, composite=name)(
        classifier.normalize(images[:1]), relevance
    )
    assert input_relevance.shape == (1, 3, 64, 64) and torch.isfinite(input_relevance).all()
    ratio = (input_relevance.sum() / relevance.sum()).item()
    assert 0.8 < ratio < 1.2, ratio


def test_sum_plus_splits_by_the_positive_parts_the_slow_obvious_way():
    from zennit.layer import Sum

    summands = torch.tensor([[[3.0, -2.0], [-1.0, 4.0], [2.0, 0.5], [-0.2, -0.3]]])  # (1, 4 units, 2)
    relevance = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    propagator = RelevancePropagator(
        nn.Sequential(nn.Identity(), Sum()), "EpsilonPlusFlatSumPlus", "none", torch.zeros(1), torch.ones(1)
    )
    _, got = propagator(summands, relevance)
    positive = summands.clamp(min=0)
    shares = positive / positive.sum(-1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(got, shares * relevance[..., None], rtol=1e-5, atol=1e-6)


def test_sum_plus_has_no_spikes_and_conserves_on_live_units(classifier, images):
    normalised = classifier.normalize(images)
    features = classifier.split("block1").features(normalised)
    relevance = torch.rand_like(features) * (features > 0)
    _, plus = propagator_for(classifier, composite="EpsilonPlusFlatSumPlus")(normalised, relevance)
    ratio = plus.sum((1, 2, 3)) / relevance.sum((1, 2, 3))
    torch.testing.assert_close(ratio, torch.ones(2), rtol=0, atol=1e-3)
    assert (plus.sum(1) >= -1e-6).all(), "every rule of this composite keeps relevance non-negative"


def test_zplus_fallback_the_slow_obvious_way():
    # A 1x1 convolution is a linear layer per pixel. Unit 0 has only negative weights: on the image with
    # positive inputs it has no positive contribution, and z+ drops its relevance. The second image has a
    # negative input, which exercises the (x⁻, w⁻) and (x⁻, w⁺) terms.
    layer = nn.Conv2d(4, 3, 1)
    weight = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [0.5, -1.0, 2.0, 0.3], [1.0, 1.0, -0.5, 0.2]])
    layer.weight.data = weight[..., None, None]
    layer.bias.data.fill_(2.0)
    x = torch.tensor([[0.3, 0.8, 0.5, 0.2], [0.4, 0.1, 0.9, -0.7]])
    relevance = torch.tensor([[1.0, 2.0, 0.5], [0.7, -1.0, 1.5]])

    def propagate(rule) -> torch.Tensor:
        model = nn.Sequential(layer).requires_grad_(False)
        _, got = Gradient(model, LayerMapComposite([(Convolution, rule)]))(
            x[..., None, None].requires_grad_(True), relevance[..., None, None]
        )
        return got[..., 0, 0]

    contributions = x[:, None, :] * weight[None]  # (B, out, in), the bias left out
    positive, negative = contributions.clamp(min=0), contributions.clamp(max=0)
    z_plus, z_minus = positive.sum(2, keepdim=True), negative.sum(2, keepdim=True)
    eps = 1e-6
    shares = positive / (z_plus + eps) + eps / (z_plus + eps) * negative / (z_minus - eps)
    expected = (shares * relevance[..., None]).sum(1)
    got = propagate(ZPlusFallback())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), relevance.sum(1), rtol=1e-5, atol=1e-6)
    # Control: z+ drops unit 0's relevance on the first image.
    dropped = relevance.sum(1) - propagate(ZPlus(zero_params=["bias"])).sum(1)
    torch.testing.assert_close(dropped, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def resnet50() -> Classifier:
    return randomised_classifier(name="resnet50")


def conservation(
    classifier: Classifier, layer: str, canonizer: str | None = None, composite: str | None = None
) -> float:
    """Input relevance / relevance put at ``layer`` (uniform random, positive) for one 64 px image,
    under, unless given, the classifier's default composite and canonizer."""
    defaults = lrp_defaults(classifier)
    propagator = propagator_for(
        classifier,
        layer,
        composite=composite or defaults.composite,
        canonizer=canonizer or defaults.canonizer,
    )
    normalised = classifier.normalize(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    relevance = torch.rand_like(classifier.split(layer).features(normalised))
    _, input_relevance = propagator(normalised, relevance)
    return (input_relevance.sum() / relevance.sum()).item()


def test_resnet50_conserves_relevance_at_conv3_4_with_its_defaults(resnet50):
    assert lrp_defaults(resnet50).canonizer == "resnet"
    assert conservation(resnet50, "conv3_4") == pytest.approx(1.0, abs=1e-3)


def test_resnet50_conserves_relevance_at_conv3_4_with_the_zplus_fallback(resnet50):
    # Two projection shortcuts (layer1.0, layer2.0) and Bottleneck blocks.
    ratio = conservation(resnet50, "conv3_4", composite="EpsilonPlusFlatZPlusFallback")
    assert ratio == pytest.approx(1.0, abs=1e-3)


def test_resnet50_without_the_canonizer_does_not_conserve(resnet50):
    # Negative control: four residual blocks, each handing the full relevance to both branches.
    ratio = conservation(resnet50, "conv3_4", canonizer="none")
    assert abs(ratio - 1) > 0.1, ratio


def test_vgg16_conserves_relevance_at_conv4_1_with_its_defaults():
    assert conservation(randomised_classifier(name="vgg16"), "conv4_1") == pytest.approx(1.0, abs=1e-3)
