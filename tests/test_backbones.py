"""The classifier registry: names, taps, prefix and suffix, weights, eval mode, saving, the shipped one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision import models

from readout.backbones import (
    BACKBONES,
    CHECKPOINT_DIR,
    load_classifier,
    load_saved_classifier,
    save_classifier,
)
from readout.train_classifier import evaluate, main


def test_an_unknown_classifier_name_lists_the_registered_ones() -> None:
    with pytest.raises(KeyError) as error:
        load_classifier("resnet51")
    assert all(name in str(error.value) for name in BACKBONES)


def test_an_unknown_layer_lists_the_valid_ones() -> None:
    classifier = load_classifier("synthetic-cnn", weights=None)
    with pytest.raises(KeyError) as error:
        classifier.prefix("block4")
    assert "block4" in str(error.value) and "conv1, block1, block2, block3, fc" in str(error.value)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_prefix_then_suffix_is_the_whole_model(name: str) -> None:
    torch.manual_seed(0)
    classifier = load_classifier(name, weights=None)
    spec = BACKBONES[name]
    images = torch.rand(2, 3, 32, 32)  # small: the taps, not the resolution, are tested
    with torch.no_grad():
        full = classifier(images)
        assert full.shape == (2, classifier.num_classes)
        for layer in dict.fromkeys([spec.per_sample_layer, spec.readout_layer, *spec.readout_taps]):
            middle = classifier.prefix(layer)(classifier.normalize(images))
            torch.testing.assert_close(classifier.suffix(layer)(middle), full, msg=f"{name} at {layer}")


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
    filename = Path(BACKBONES[name].weights_enum.IMAGENET1K_V1.url).name
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
    meta = json.loads((CHECKPOINT_DIR / "synthetic-cnn.json").read_text())
    unseen = 1001
    assert unseen not in (meta["training"]["seed"], meta["evaluation"]["seed"])
    assert classifier.classes == meta["classes"] and classifier.input_size == 64
    assert meta["evaluation"]["top1"] >= 0.95
    assert evaluate(classifier, 512, 64, seed=unseen) >= 0.95


def test_the_training_cli_writes_weights_and_metadata_that_load(tmp_path: Path) -> None:
    out = tmp_path / "tiny-cnn"
    main(["--out", str(out), "--n-train", "64", "--epochs", "1", "--batch-size", "32", "--size", "32"]
         + ["--n-eval", "16", "--min-accuracy", "0"])  # fmt: skip
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "synthetic-cnn" and meta["input_size"] == 32
    assert meta["training"]["command"].startswith("python -m readout.train_classifier --out")
    assert "--evaluate-only" in meta["evaluation"]["command"] and 0 <= meta["evaluation"]["top1"] <= 1
    loaded = load_classifier(str(out.with_suffix(".safetensors")))
    assert evaluate(loaded, 16, 32, seed=meta["evaluation"]["seed"]) == meta["evaluation"]["top1"]


def test_training_from_init_starts_at_the_saved_weights(tmp_path: Path) -> None:
    # A vanishing learning rate leaves the convolutions where they started: at the init's weights.
    shipped = load_classifier("synthetic-cnn")
    out = tmp_path / "fine-tuned"
    main(["--out", str(out), "--init", str(CHECKPOINT_DIR / "synthetic-cnn"), "--n-train", "32"]
         + ["--epochs", "1", "--batch-size", "32", "--size", "32", "--lr", "1e-12", "--n-eval", "8"]
         + ["--min-accuracy", "0"])  # fmt: skip
    tuned = load_classifier(str(out.with_suffix(".safetensors"))).stages.state_dict()
    for key, value in shipped.stages.state_dict().items():
        if key.endswith(".weight") and value.dim() == 4:
            torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-6)
