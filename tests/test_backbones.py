"""The classifier registry: names, paper aliases, weights, eval mode, saving, the shipped one."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

from readout.backbones import PAPER_DEFAULTS, entry, load_classifier, load_saved_classifier, save_classifier
from readout.classifier import Classifier, tap_info
from readout.resources import checkpoint_dir
from readout.taps import tap_module
from readout.tools.train_classifier import evaluate


def test_an_unknown_classifier_name_says_what_names_are() -> None:
    with pytest.raises(KeyError) as error:
        load_classifier("resnet51")
    assert "'resnet51'" in str(error.value) and "synthetic-cnn" in str(error.value)
    assert "a torchvision classification model" in str(error.value)


def test_an_unknown_layer_lists_the_valid_ones() -> None:
    classifier = load_classifier("synthetic-cnn", weights=None)
    with pytest.raises(KeyError) as error:
        classifier.split("block4")
    assert "block4" in str(error.value) and "conv1, block1, block2, block3, fc" in str(error.value)
    assert "did you mean block3" in str(error.value)


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "synthetic-cnn"])
def test_prefix_then_suffix_is_the_whole_model(name: str) -> None:
    torch.manual_seed(0)
    classifier = load_classifier(name, weights=None)
    defaults = classifier.defaults
    images = torch.rand(2, 3, 32, 32)  # small: the layers, not the resolution, are tested
    classifier.input_size = 32
    with torch.no_grad():
        full = classifier(images)
        assert full.shape == (2, classifier.num_classes)
        for layer in dict.fromkeys([defaults.per_sample_layer, defaults.readout_layer]):
            split = classifier.split(layer)
            assert split.traced, f"{name} at {layer}"
            x = classifier.normalize(images)
            torch.testing.assert_close(split.logits(split.features(x), x), full, msg=f"{name} at {layer}")


def test_resnet50_stages_compute_what_torchvision_computes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = models.resnet50(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    classifier = load_classifier(
        "resnet50", weights="IMAGENET1K_V1", weights_path=str(tmp_path / "weights.pth")
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), reference(classifier.normalize(images)))


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_missing_pretrained_weights_name_the_file_and_never_download(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    filename = Path(entry(name).weights_enum.IMAGENET1K_V1.url).name
    with pytest.raises(FileNotFoundError, match=filename):
        load_classifier(name)
    assert not any(tmp_path.iterdir())


def test_the_classifier_stays_in_eval_mode() -> None:
    classifier = load_classifier("synthetic-cnn", weights=None)
    classifier.train()
    assert not classifier.training and not any(module.training for module in classifier.modules())
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    classifier(torch.rand(4, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert not any(p.requires_grad for p in classifier.parameters())


def test_save_then_load_gives_the_same_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = load_classifier("synthetic-cnn", weights=None)
    for module in classifier.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    classifier.classes = ["a", "b", "c", "d", "e", "f"]
    classifier.mean.fill_(0.4)
    save_classifier(classifier, tmp_path / "model", {"note": "round trip"})
    loaded = load_saved_classifier(tmp_path / "model.safetensors")
    assert loaded.classes == classifier.classes and loaded.input_size == classifier.input_size
    assert json.loads((tmp_path / "model.json").read_text())["note"] == "round trip"
    images = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(loaded(images), classifier(images))
    assert torch.equal(loaded.mean, classifier.mean) and torch.equal(loaded.std, classifier.std)


def test_the_shipped_synthetic_cnn_scores_at_least_95_percent_on_an_unseen_seed() -> None:
    classifier = load_classifier("synthetic-cnn")
    meta = json.loads((checkpoint_dir() / "synthetic-cnn.json").read_text())
    unseen = 1001
    assert unseen not in (meta["training"]["seed"], meta["evaluation"]["seed"])
    assert classifier.classes == meta["classes"] and classifier.input_size == 64
    assert meta["evaluation"]["top1"] >= 0.95
    assert evaluate(classifier, 512, 64, seed=unseen) >= 0.95


def test_weights_from_the_torch_hub_cache_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.hub.get_dir() is $TORCH_HOME/hub; torchvision caches weights there under checkpoints/.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = models.resnet50(weights=None).eval()
    cached = tmp_path / "hub" / "checkpoints" / Path(models.ResNet50_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    classifier = load_classifier("resnet50", weights="IMAGENET1K_V1")
    assert torch.equal(classifier.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(classifier.model.fc.weight, reference.fc.weight)
    assert torch.equal(classifier.model.layer1[0].bn2.running_var, reference.layer1[0].bn2.running_var)
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # nothing downloaded beside it


def _saved(tmp_path: Path, change: Callable[[dict], object] | None = None) -> Path:
    """A saved synthetic-cnn whose JSON is edited by ``change`` (which may return new JSON text)."""
    save_classifier(load_classifier("synthetic-cnn", weights=None), tmp_path / "saved", {})
    meta_path = tmp_path / "saved.json"
    if change is not None:
        meta = json.loads(meta_path.read_text())
        text = change(meta)
        meta_path.write_text(text if isinstance(text, str) else json.dumps(meta))
    return tmp_path / "saved.safetensors"


def _without_json(tmp_path: Path) -> Path:
    path = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    return path


BAD_LOADS: dict[str, tuple[Callable[[Path], Callable[[], object]], type, str]] = {
    "missing-weights-path": (
        lambda tmp: lambda: load_classifier("resnet50", weights_path=str(tmp / "nope.pth")),
        FileNotFoundError,
        "weights_path {tmp}/nope.pth does not exist",
    ),
    "weights-none-with-a-path": (
        lambda tmp: lambda: load_classifier("vgg16", weights=None, weights_path=str(tmp / "w.pth")),
        ValueError,
        "weights=None (random init) contradicts weights_path='{tmp}/w.pth' for 'vgg16': drop weights_path "
        "for random init, or set weights (e.g. 'IMAGENET1K_V1') to load the file",
    ),
    "weights-path-of-another-model": (
        lambda tmp: lambda: load_classifier("resnet18", weights_path=str(_weights_of("vgg11", tmp))),
        ValueError,
        "weights_path {tmp}/vgg11.pth does not fit the model: Error(s) in loading state_dict",
    ),
    "weights-path-holds-no-state-dict": (
        lambda tmp: lambda: load_classifier("resnet18", weights_path=str(_not_a_state_dict(tmp))),
        ValueError,
        "{tmp}/list.pth holds a list, not a state dict",
    ),
    "an-unknown-name": (
        lambda tmp: lambda: load_classifier("resnet51", weights_path=str(tmp / "w.pth")),
        KeyError,
        "unknown classifier 'resnet51': not 'synthetic-cnn', a torchvision classification model, an import "
        "path 'package.module:callable', nor a saved classifier file",
    ),
    "unknown-weights-entry": (
        lambda tmp: lambda: load_classifier("vgg16", weights="IMAGENET1K_V9"),
        ValueError,
        "unknown weights 'IMAGENET1K_V9' for 'vgg16'; valid: IMAGENET1K_V1, IMAGENET1K_FEATURES, DEFAULT, "
        "or null for random init",
    ),
    "an-enum-method-is-no-weights-entry": (
        lambda tmp: lambda: load_classifier("resnet50", weights="verify"),
        ValueError,
        "unknown weights 'verify' for 'resnet50'; valid: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT",
    ),
    "saved-json-missing": (
        lambda tmp: lambda: load_classifier(str(_without_json(tmp))),
        FileNotFoundError,
        "classifier file {tmp}/saved.json is missing: a saved classifier is saved.safetensors with "
        "saved.json beside it, as save_classifier writes them",
    ),
    "saved-json-not-json": (
        lambda tmp: lambda: load_classifier(str(_saved(tmp, lambda meta: "{"))),
        ValueError,
        "{tmp}/saved.json is not valid JSON",
    ),
    "saved-json-wrong-format": (
        lambda tmp: lambda: load_classifier(str(_saved(tmp, lambda meta: meta.update(format="other/2")))),
        ValueError,
        "{tmp}/saved.json is not a readout classifier: format 'other/2', expected 'readout-classifier/2'",
    ),
    "saved-json-lacks-a-field": (
        lambda tmp: lambda: load_classifier(str(_saved(tmp, lambda meta: meta.pop("input_size")))),
        ValueError,
        "{tmp}/saved.json lacks the field(s) input_size",
    ),
    "saved-unknown-architecture": (
        lambda tmp: (
            lambda: load_classifier(str(_saved(tmp, lambda meta: meta.update(source={"torchvision": "vit"}))))
        ),
        KeyError,
        "unknown classifier 'vit'",
    ),
    "saved-architecture-mismatch": (
        lambda tmp: (
            lambda: load_classifier(
                str(_saved(tmp, lambda meta: meta.update(source={"torchvision": "resnet18"})))
            )
        ),
        ValueError,
        "{tmp}/saved.safetensors does not fit the model: Error(s) in loading state_dict",
    ),
    "saved-import-path-without-permission": (
        lambda tmp: (
            lambda: load_classifier(
                str(_saved(tmp, lambda meta: meta.update(source={"import": "os:system"})))
            )
        ),
        ValueError,
        "{tmp}/saved.json names the import path 'os:system' for its classifier. readout never imports code "
        "named in a file",
    ),
}


def _weights_of(name: str, tmp: Path) -> Path:
    path = tmp / f"{name}.pth"
    torch.save(models.get_model(name, weights=None).state_dict(), path)
    return path


def _not_a_state_dict(tmp: Path) -> Path:
    torch.save([1, 2, 3], tmp / "list.pth")
    return tmp / "list.pth"


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_bad_weights_and_saved_classifiers_are_clear_errors(case: str, tmp_path: Path) -> None:
    make_call, error, message = BAD_LOADS[case]
    call = make_call(tmp_path)
    with pytest.raises(error) as raised:
        call()
    assert message.format(tmp=tmp_path) in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# Taps: the paper's names (Tables 3 and 4) on the torchvision modules they mean.


@pytest.fixture(scope="module")
def wrapped() -> Iterator[dict[str, tuple[Classifier, nn.Module]]]:
    """resnet50 and vgg16 (random init) with the torchvision models they wrap."""
    torch.manual_seed(0)
    classifiers = {name: load_classifier(name, weights=None) for name in ("resnet50", "vgg16")}
    yield {name: (classifier, classifier.model) for name, classifier in classifiers.items()}


def _resnet50_modules(model: nn.Module) -> dict[str, nn.Module]:
    # He et al. (2016), Table 1: conv2_x is layer1, ...; conv<s>_<b> is block b of stage s, counted from 1.
    return {"conv2_3": model.layer1[2], "conv3_4": model.layer2[3], "conv4_6": model.layer3[5],
            "conv5_3": model.layer4[2], "fc": model.fc}  # fmt: skip


def _vgg16_modules(model: nn.Module) -> dict[str, nn.Module]:
    # torchvision's vgg16.features: conv3_1 = [10], conv4_1 = [17], conv5_1 = [24], conv5_3 = [28].
    # The tap is the convolution's output, before its ReLU, as the IBA reference code's features.17.
    features = model.features
    return {"conv3_1": features[10], "conv4_1": features[17], "conv5_1": features[24],
            "conv5_3": features[28], "fc": model.classifier[6]}  # fmt: skip


MODULES = {"resnet50": _resnet50_modules, "vgg16": _vgg16_modules}


@pytest.mark.parametrize("name", list(MODULES))
def test_paper_taps_are_the_torchvision_modules_they_name(name: str, wrapped: dict) -> None:
    classifier, reference = wrapped[name]
    expected = MODULES[name](reference)
    defaults = PAPER_DEFAULTS[name][1]
    assert set(defaults.readout_taps) | {defaults.per_sample_layer, defaults.readout_layer} <= set(expected)
    for layer, module in expected.items():
        assert tap_module(classifier, layer) is module, f"{name} {layer}"


def test_vgg16_taps_come_before_their_relu(wrapped: dict) -> None:
    classifier, reference = wrapped["vgg16"]
    for layer in ("conv3_1", "conv4_1", "conv5_1", "conv5_3"):
        index = int(classifier.resolve(layer).split(".")[1])
        assert isinstance(classifier.model.features[index], nn.Conv2d)
        assert isinstance(classifier.model.features[index + 1], nn.ReLU)
        assert classifier.model.features[index + 1] is reference.features[index + 1]


TAP_SHAPES = {
    "resnet50": {"conv2_3": (256, 4), "conv3_4": (512, 8), "conv4_6": (1024, 16), "conv5_3": (2048, 32)},
    "vgg16": {"conv3_1": (256, 4), "conv4_1": (512, 8), "conv5_1": (512, 16), "conv5_3": (512, 16)},
}


@pytest.mark.parametrize("name", list(TAP_SHAPES))
def test_tap_info_gives_the_channels_and_strides_of_the_paper_taps(name: str, wrapped: dict) -> None:
    classifier, _ = wrapped[name]
    layers = [*TAP_SHAPES[name], "fc"]
    infos = {info.name: info for info in tap_info(classifier, layers, input_size=64)}
    for layer, (channels, stride) in TAP_SHAPES[name].items():
        info = infos[layer]
        assert (info.channels, info.stride, info.spatial) == (channels, stride, True), f"{name} {layer}"
        assert (info.height, info.width) == (64 // stride, 64 // stride)
    assert (infos["fc"].channels, infos["fc"].spatial) == (1000, False)


def test_vgg16_computes_what_torchvision_computes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = models.vgg11(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "vgg11.pth")
    classifier = load_classifier("vgg11", weights_path=str(tmp_path / "vgg11.pth"))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), reference(classifier.normalize(images)))


@pytest.mark.parametrize(
    "name", ["synthetic-cnn", "resnet18", "mobilenet_v3_small", "readout.backbones:SyntheticCNN"]
)
def test_save_then_load_round_trips_every_kind_of_source(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": 3} if ":" in name else None
    classifier = load_classifier(name, weights=None, input_size=32, classes=["a", "b", "c"], kwargs=kwargs)
    save_classifier(classifier, tmp_path / "saved", {})
    allow = ":" in name
    loaded = load_classifier(str(tmp_path / "saved.safetensors"), allow_import=allow)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), classifier(images))
    assert (loaded.classes, loaded.input_size, loaded.source) == (classifier.classes, 32, classifier.source)
    given = load_saved_classifier(tmp_path / "saved.safetensors", model=classifier.model)
    torch.testing.assert_close(given(images), classifier(images))


def test_a_classifier_built_from_a_module_alone_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="records no way to rebuild it"):
        save_classifier(Classifier(models.resnet18(num_classes=3), classes=3), tmp_path / "x", {})
