"""The classifier adapter: any nn.Module, layers by module path, the dry run, the rule, the split."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchvision import models

from readout.classifier import Classifier, LayerDefaults, stage_ends
from readout.split import HookedSplit, NotSplittable, trace_split
from readout.taps import FeatureTaps, hook_count


class Branchy(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it, so the hook path is taken."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > -1:  # always true, but only known at run time
            x = self.stage(x)
        return self.head(x.mean((2, 3)))


def test_a_plain_module_gets_layers_by_module_path_and_the_default_rule() -> None:
    torch.manual_seed(0)
    classifier = Classifier(models.resnet18(num_classes=6), input_size=64, classes=6, name="mine")
    assert classifier.defaults == LayerDefaults(
        "layer2", "layer1", ("layer1", "layer2", "layer3", "layer4", "logits")
    )
    assert stage_ends(classifier) == [
        ("relu", 2),
        ("layer1", 4),
        ("layer2", 8),
        ("layer3", 16),
        ("layer4", 32),
    ]
    infos = {info.name: info for info in classifier.tap_info(["layer1", "layer3.1.conv2", "fc", "logits"])}
    assert (infos["layer1"].channels, infos["layer1"].stride, infos["layer1"].height) == (64, 4, 16)
    assert (infos["layer3.1.conv2"].channels, infos["layer3.1.conv2"].stride) == (256, 16)
    assert (infos["fc"].channels, infos["fc"].spatial) == (6, False)
    assert infos["logits"].path == "" and infos["logits"].channels == 6


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("densenet121", ("features.denseblock2", "features.denseblock1")),
        ("efficientnet_b0", ("features.3", "features.2")),
        ("convnext_tiny", ("features.3", "features.1")),
        ("vgg11_bn", ("features.20", "features.13")),
    ],
)
def test_the_rule_puts_the_bottleneck_at_the_ends_of_stages(name: str, expected: tuple[str, str]) -> None:
    classifier = Classifier(models.get_model(name, num_classes=6), input_size=64, classes=6)
    defaults = classifier.defaults
    assert (defaults.per_sample_layer, defaults.readout_layer) == expected
    strides = [info.stride for info in classifier.tap_info(list(defaults.readout_taps))]
    assert strides[:2] == [4, 8] and defaults.readout_taps[-1] == "logits"


def test_a_layer_that_runs_twice_is_refused_by_name() -> None:
    classifier = Classifier(models.resnet18(num_classes=6), input_size=64, classes=6)
    with pytest.raises(ValueError, match=r"layer 'layer1.0.relu' \(layer1.0.relu\) runs 2 times"):
        classifier.tap_info(["layer1.0.relu"])


def test_an_unknown_layer_suggests_close_module_paths() -> None:
    classifier = Classifier(models.resnet18(num_classes=6), input_size=64, classes=6, name="mine")
    with pytest.raises(
        KeyError, match=r"unknown layer 'layer5' for classifier 'mine' \(did you mean layer.*"
    ):
        classifier.module("layer5")


def test_a_tap_before_an_in_place_relu_records_the_value_before_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(256, 2)
    )
    classifier = Classifier(model, (0.5,) * 3, (0.25,) * 3, 8, 2)
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad(), FeatureTaps(classifier, ["0"]) as taps:
        classifier(images)
    expected = model[0](classifier.normalize(images))
    assert (expected < 0).any()
    torch.testing.assert_close(taps.features["0"], expected)


def test_the_traced_split_runs_only_what_lies_after_the_layer() -> None:
    torch.manual_seed(0)
    model = models.resnet18(num_classes=6).eval()
    split = trace_split(model, "layer2")
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in model.named_modules() if n
    ]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = split.features(x)
        calls.clear()
        logits = split.logits(features, x)
    for handle in handles:
        handle.remove()
    assert calls and all(not name.startswith(("conv1", "bn1", "layer1", "layer2")) for name in calls)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def test_a_layer_inside_a_residual_block_is_no_cut() -> None:
    with pytest.raises(NotSplittable, match="skip connection"):
        trace_split(models.resnet18(num_classes=6).eval(), "layer1.0.conv1")


def test_an_untraceable_model_takes_the_hook_path_logged_once_with_the_same_logits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    classifier = Classifier(Branchy(), input_size=32, classes=3, name="branchy")
    with caplog.at_level(logging.WARNING, logger="readout.split"):
        split = classifier.split("stem")
        assert classifier.split("stem") is split
    assert isinstance(split, HookedSplit) and not split.traced
    assert len(caplog.records) == 1 and "forward hook" in caplog.records[0].message
    images = torch.rand(2, 3, 32, 32)
    x = classifier.normalize(images)
    with torch.no_grad():
        features = split.features(x)
        torch.testing.assert_close(split.logits(features, x), classifier(images))
        repeated = split.logits(features.repeat_interleave(3, 0), x)
    torch.testing.assert_close(repeated[::3], classifier(images))
    assert hook_count(classifier) == 0


def test_the_classifier_is_frozen_and_in_eval_mode_whatever_its_module_was() -> None:
    model = models.resnet18(num_classes=6).train()
    classifier = Classifier(model, input_size=64, classes=6)
    classifier.train()
    assert not any(module.training for module in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_classes_that_do_not_match_the_logits_are_refused() -> None:
    classifier = Classifier(models.resnet18(num_classes=6), input_size=64, classes=1000, name="mine")
    with pytest.raises(ValueError, match=r"'mine' gives \(1, 6\) .* not logits \(1, 1000\)"):
        classifier.tap_info(["layer1"])


def test_per_sample_takes_a_plain_module_with_imagenet_preprocessing() -> None:
    import readout

    torch.manual_seed(0)
    attributor = readout.PerSample(models.resnet18(num_classes=5), layer="layer2", steps=1, copies=1)
    assert attributor.classifier.num_classes == 5 and attributor.classifier.input_size == 224
    torch.testing.assert_close(attributor.classifier.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    attributor.estimate([torch.rand(2, 3, 224, 224)], progress=False)
    assert attributor(torch.rand(1, 3, 224, 224)).shape == (1, 224, 224)
    readout_bottleneck = readout.ReadoutBottleneck(models.resnet18(num_classes=5))
    assert readout_bottleneck.layer == "layer1"
