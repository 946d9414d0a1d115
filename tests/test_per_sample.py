import pytest
import torch

from readout.backbones import load_classifier
from readout.per_sample import PerSample
from readout.reference import straightforward_heatmaps


@pytest.fixture(scope="module")
def attributor():
    torch.manual_seed(0)
    classifier = load_classifier("synthetic-cnn", weights=None)
    attributor = PerSample(classifier, steps=4, copies=3, seed=0)
    attributor.estimate([torch.rand(16, 3, 64, 64) for _ in range(3)], progress=False)
    return attributor


def test_batched_equals_straightforward_on_the_same_noise(attributor):
    images = torch.rand(3, 3, 64, 64)
    noise = torch.randn(attributor.steps, 3, attributor.copies, *attributor.shape)
    explanation = attributor.explain(images, noise=noise)
    reference = straightforward_heatmaps(attributor, images, explanation.target, noise)
    torch.testing.assert_close(explanation.heatmap, reference, rtol=1e-4, atol=1e-7)


def test_batch_equals_images_one_by_one(attributor):
    images = torch.rand(2, 3, 64, 64)
    noise = torch.randn(attributor.steps, 2, attributor.copies, *attributor.shape)
    together = attributor.explain(images, target=torch.tensor([1, 4]), noise=noise).heatmap
    alone = [
        attributor.explain(images[i : i + 1], target=t, noise=noise[:, i : i + 1]).heatmap
        for i, t in [(0, 1), (1, 4)]
    ]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-7)


def test_classifier_weights_never_get_gradients(attributor):
    attributor(torch.rand(1, 3, 64, 64))
    assert all(p.grad is None and not p.requires_grad for p in attributor.classifier.parameters())
    assert not attributor.classifier.training


def test_explanation_is_consistent(attributor):
    images = torch.rand(2, 3, 64, 64)
    explanation = attributor.explain(images)
    assert explanation.heatmap.shape == (2, 64, 64)
    torch.testing.assert_close(explanation.heatmap.sum((1, 2)), explanation.total_bits)
    torch.testing.assert_close(explanation.target, attributor.classifier(images).argmax(1))
    assert explanation.information.shape == (2, *attributor.shape)
    assert ((explanation.lam >= 0) & (explanation.lam <= 1)).all()


def test_information_drops_from_its_initial_value(attributor):
    # α starts at 5, where almost all of the signal passes; β pushes it down.
    images = torch.rand(2, 3, 64, 64)
    initial = attributor.bottleneck.information(
        attributor.features(images), torch.full((2, *attributor.shape), 5.0)
    )
    assert (attributor.explain(images).information.sum((1, 2, 3)) < initial.sum((1, 2, 3)) / 0.6931).all()


def test_wrong_image_size_is_a_clear_error(attributor):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        attributor(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize(
    "kwargs, message", [({"beta": 0}, "beta must be > 0"), ({"steps": 0}, "steps and copies")]
)
def test_bad_hyperparameters_are_clear_errors(attributor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerSample(attributor.classifier, **kwargs)


def test_default_layer_comes_from_the_registry():
    assert PerSample(load_classifier("resnet50", weights=None)).layer == "conv3_4"
