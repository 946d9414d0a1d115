import pytest
import torch

from readout.backbones import load_classifier
from readout.bottleneck import FeatureStatistics
from readout.readout_bottleneck import ReadoutBottleneck
from readout.readout_net import ReadoutNet, stack_readout_features


@pytest.fixture(scope="module")
def readout():
    torch.manual_seed(0)
    attributor = ReadoutBottleneck(load_classifier("synthetic-cnn", weights=None))
    attributor.estimate([torch.rand(16, 3, 64, 64) for _ in range(2)], progress=False)
    return attributor


def test_readout_net_widths_follow_the_papers_code():
    net = ReadoutNet(in_channels=40, out_channels=8)
    convs = [m for m in net.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(40, 20), (20, 16), (16, 8)]


def test_readout_starts_at_alpha_five(readout):
    _, _, features = readout.first_pass(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(readout.alpha(features), torch.full((2, *readout.shape), 5.0))


def test_stacked_features_are_normalised_upsampled_and_broadcast():
    maps, logits = torch.randn(2, 3, 4, 4) * 2 + 1, torch.randn(2, 5)
    stats = [FeatureStatistics((3, 4, 4)), FeatureStatistics((5,))]
    stats[0].update(maps)
    stats[1].update(logits)
    stacked = stack_readout_features([maps, logits], stats, (8, 8))
    assert stacked.shape == (2, 8, 8, 8)
    normalised_logits = (logits - stats[1].mean) / stats[1].std
    torch.testing.assert_close(stacked[:, 3:, 5, 2], normalised_logits)
    upsampled = torch.nn.functional.interpolate(
        (maps - stats[0].mean) / stats[0].std, size=(8, 8), mode="bilinear"
    )
    torch.testing.assert_close(stacked[:, :3], upsampled)


def test_heatmap_is_one_forward_pass_and_matches_explain(readout):
    images = torch.rand(3, 3, 64, 64)
    calls = []
    handle = readout.classifier.model.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        heatmap = readout(images)
    finally:
        handle.remove()
    assert len(calls) == 1
    explanation = readout.explain(images)
    torch.testing.assert_close(heatmap, explanation.heatmap)
    torch.testing.assert_close(heatmap.sum((1, 2)), explanation.total_bits)


def test_statistics_of_every_tap_are_estimated_and_saved(readout):
    assert all(s.count.item() == 32 for s in readout.all_statistics())
    keys = [k for k in readout.state_dict() if not k.startswith("classifier.")]
    assert any(k.startswith("readout_statistics.3.") for k in keys)  # fc logits
    assert readout.tap_statistics[-1].shape == (6,)


def test_default_taps_come_from_the_registry():
    resnet = ReadoutBottleneck(load_classifier("resnet50", weights=None))
    assert resnet.layer == "conv2_3" and resnet.taps == ["conv2_3", "conv3_4", "conv4_6", "conv5_3", "fc"]
    assert resnet.net.layers[0].in_channels == 256 + 512 + 1024 + 2048 + 1000


def test_unknown_tap_is_a_clear_error():
    with pytest.raises(KeyError, match="conv9_9.*valid layers"):
        ReadoutBottleneck(load_classifier("synthetic-cnn", weights=None), taps=["block1", "conv9_9"])


@pytest.mark.parametrize(
    "target, message",
    [(6, r"class indices in \[0, 6\)"), (torch.tensor([0, 1, 2]), "the batch has 2 images")],
)
def test_a_bad_target_is_refused_though_the_heatmap_does_not_use_it(readout, target, message):
    with pytest.raises(ValueError, match=message):
        readout(torch.rand(2, 3, 64, 64), target)
    assert readout(torch.rand(2, 3, 64, 64), torch.tensor([0, 5])).shape == (2, 64, 64)


ALL_KINDS = [(3, 16, 16), (4, 8, 8), (5, 3, 5), (6,)]


@pytest.mark.parametrize(
    "shapes",
    [ALL_KINDS, [(4, 8, 8)], [(6,), (12,)]],
    ids=["larger-equal-smaller-vector", "one-map", "vectors-only"],
)
def test_first_layer_before_the_resize_gives_the_alpha_of_the_stacked_features(shapes):
    # The first 1x1 convolution commutes with the bilinear resize and the broadcast (all linear):
    # maps larger than, equal to and smaller than the bottleneck's 8x8, and logits; the values and
    # the gradients of the net's weights (the forward sums in place and in channels_last).
    torch.manual_seed(3)
    features = [torch.randn(2, *shape) for shape in shapes]
    stats = []
    for x in features:
        s = FeatureStatistics(tuple(x.shape[1:]))
        s.update(torch.randn(10, *x.shape[1:]) * 2 + 1)
        stats.append(s)
    channels = sum(shape[0] for shape in shapes)
    net = ReadoutNet(in_channels=channels, out_channels=7).double()
    for layer in net.layers:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight)  # the zero-initialised last layer would hide everything
    features = [x.double() for x in features]
    stacked = net.stacked(stack_readout_features(features, stats, (8, 8)))
    stacked_grads = torch.autograd.grad(stacked.square().sum(), list(net.parameters()))
    direct = net(features, stats, (8, 8))
    direct_grads = torch.autograd.grad(direct.square().sum(), list(net.parameters()))
    assert direct.shape == (2, 7, 8, 8) and stacked.abs().max() > 1
    torch.testing.assert_close(direct, stacked, rtol=1e-10, atol=1e-10)
    for got, expected in zip(direct_grads, stacked_grads, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    missing = channels - shapes[-1][0]
    message = f"the taps have {missing} channels, the readout net reads {channels}"
    with pytest.raises(ValueError, match=message):
        net(features[:-1], stats[:-1], (8, 8))


@pytest.mark.parametrize("kind", ["per-sample", "readout"])
def test_an_attributor_is_made_on_its_classifiers_device(kind):
    # Built around a classifier already on a GPU, the statistics and the readout net were made on the
    # CPU, and estimate() failed with "Expected all tensors to be on the same device" (found on an H200).
    # The meta device stands in for the GPU here: nothing of the attributor may stay on the CPU.
    from readout.per_sample import PerSample

    classifier = load_classifier("synthetic-cnn", weights=None).to("meta")
    attributor = PerSample(classifier) if kind == "per-sample" else ReadoutBottleneck(classifier)
    tensors = [*attributor.parameters(), *attributor.buffers()]
    assert {tensor.device.type for tensor in tensors} == {"meta"}
