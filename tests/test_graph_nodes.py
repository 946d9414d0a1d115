"""torchvision's graph node names as layers: the same model, the node a module path, the user's
module untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import readout
from readout.classifier import Classifier
from readout.graph_nodes import with_node_taps
from readout.taps import FeatureTaps, hook_count
from readout.training.export import export_module
from readout.training.module import ReadoutModule


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return models.resnet18(num_classes=6).eval()


def node_names(model: nn.Module) -> list[str]:
    """The eval-mode graph nodes of ``model`` that are no module path (the input left out)."""
    paths = dict(model.named_modules())
    return [name for name in get_graph_node_names(model)[1] if name not in paths and name != "x"]


def test_every_graph_node_of_resnet18_becomes_a_module_that_runs_once_on_the_same_model() -> None:
    model = resnet()
    nodes = node_names(model)
    assert "layer1.0.add" in nodes and "layer1.0.relu_1" in nodes and "flatten" in nodes
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        values = create_feature_extractor(model, return_nodes=nodes)(x)
    tapped = with_node_taps(model, nodes)
    assert tapped is not None
    recorded: dict[str, torch.Tensor] = {}
    handles = [
        tapped.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: recorded.setdefault(name, output)
        )
        for name in nodes
    ]
    with torch.no_grad():
        torch.testing.assert_close(tapped(x), expected, rtol=0, atol=0)
    for handle in handles:
        handle.remove()
    assert recorded.keys() == set(nodes)
    for name in nodes:  # torchvision's own extractor gives the same value under the same name
        torch.testing.assert_close(recorded[name], values[name], rtol=0, atol=0)
    assert list(tapped.state_dict()) == keys
    # The user's module is as it was: no new attribute, no traced block, the same state dict.
    assert not any(isinstance(module, torch.fx.GraphModule) for module in model.modules())
    assert not hasattr(model.layer1[0], "add") and list(model.state_dict()) == keys


def test_a_classifier_taps_a_graph_node_by_name_and_splits_there() -> None:
    classifier = Classifier(resnet(), input_size=32, classes=6)
    (add,) = classifier.tap_info(["layer1.0.add"])
    assert (add.channels, add.height, add.stride) == (64, 8, 4)
    split = classifier.split("layer1.1.relu_1")  # the end of layer1: a cut of the graph
    assert split.traced
    with FeatureTaps(classifier, ["layer1.0.add", "flatten"]) as taps:
        classifier(torch.rand(1, 3, 32, 32))
    assert taps.features["flatten"].shape == (1, 512)
    assert hook_count(classifier) == 0


def test_per_sample_at_a_graph_node_equals_the_hook_path() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    traced = readout.PerSample(
        Classifier(resnet(), input_size=32, classes=6), "layer1.1.relu_1", steps=2, copies=2
    )
    traced.estimate([torch.rand(8, 3, 32, 32)], progress=False)
    hooked_classifier = Classifier(resnet(), input_size=32, classes=6, split="hook")
    hooked = readout.PerSample(hooked_classifier, "layer1.1.relu_1", steps=2, copies=2)
    hooked.load_state_dict(traced.state_dict())
    assert traced.split.traced and not hooked.split.traced
    noise = torch.randn(2, 2, 2, *traced.shape, generator=torch.Generator().manual_seed(2))
    a, b = traced.explain(images, noise=noise), hooked.explain(images, noise=noise)
    torch.testing.assert_close(a.heatmap, b.heatmap, rtol=1e-3, atol=1e-6 * float(a.heatmap.abs().max()))


def test_with_split_keeps_the_tapped_graph_nodes() -> None:
    classifier = Classifier(resnet(), input_size=32, classes=6)
    classifier.resolve("layer2.0.add")
    hooked = classifier.with_split("hook")
    assert "layer2.0.add" in dict(hooked.model.named_modules())
    assert not hooked.split("layer2.0.add").traced


@pytest.mark.parametrize("name", ["layer1.0.plus", "layer9.add", "conv1.weight"])
def test_a_name_that_is_neither_module_nor_node_is_an_unknown_layer(name: str) -> None:
    with pytest.raises(KeyError, match="graph node name"):
        Classifier(resnet(), input_size=32, classes=6).resolve(name)


def test_a_readout_with_graph_node_taps_exports_and_loads_to_the_same_heatmaps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ReadoutModule(
        classifier="resnet18",
        weights=None,
        input_size=32,
        classes=6,
        layer="layer1.1.relu_1",
        taps=["layer1.0.add", "layer2", "flatten", "logits"],
        heatmap_every_n_steps=0,
    )
    module.attributor.estimate([torch.rand(8, 3, 32, 32)], progress=False)
    bundle = export_module(module, str(tmp_path / "bundle"))
    loaded = readout.load(bundle, classifier=module.attributor.classifier.model)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), module.attributor(images))
