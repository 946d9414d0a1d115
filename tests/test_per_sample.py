import copy
from collections import Counter

import pytest
import torch
from torch import nn

from readout.backbones import load_classifier
from readout.per_sample import PerSample
from readout.tools.reference import straightforward_heatmaps


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


def test_noise_is_drawn_on_the_device_the_attributor_was_moved_to():
    # Built on 'meta' (which has no generator) and moved afterwards: the generator must come from the
    # device of the features, not from the one the classifier was on at construction.
    classifier = load_classifier("synthetic-cnn", weights=None).to("meta")
    attributor = PerSample(classifier, steps=2, copies=3, seed=5)
    attributor.to_empty(device="cpu")
    like = torch.zeros(2, *attributor.shape)
    noise = attributor.draw_noise(2, like)
    expected = torch.randn(2, 3, *attributor.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, expected), "the same seed gives the CPU noise it always gave"
    assert attributor.generator is not None and attributor.generator.device == like.device
    assert attributor.generator_for(like.device) is attributor.generator


def test_reseeding_the_generator_repeats_the_noise(attributor):
    # Evaluations reseed ``attributor.generator`` per batch (readout.evaluation.methods.SharedExplanation).
    assert attributor.generator is not None
    attributor.generator.manual_seed(3)
    first = attributor.draw_noise(1, torch.zeros(1))
    attributor.generator.manual_seed(3)
    assert torch.equal(attributor.draw_noise(1, torch.zeros(1)), first)


def leaves_around(attributor) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The model's leaf modules before the bottleneck (and at it) and after it, by module path."""
    model, cut = attributor.classifier.model, attributor.classifier.resolve(attributor.layer)
    names = [name for name, _ in model.named_children()]
    before = set(names[: names.index(cut) + 1])
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    prefix = {name: m for name, m in leaves.items() if name.split(".")[0] in before}
    return prefix, {name: m for name, m in leaves.items() if name not in prefix}


@pytest.mark.parametrize("fuse", [False, True], ids=["own-modules", "folded"])
def test_prefix_runs_once_and_the_suffix_once_per_step(attributor, fuse):
    # Batched and cached (issue 3): the layers before the bottleneck see the B images once; the layers
    # after it see the B clean activations once (top-1), then B·copies noisy ones on every step and in
    # the final evaluation with the fitted α. Folded, those run as a copy and the originals never.
    attributor.fuse = fuse
    batch = 2
    prefix, suffix = leaves_around(attributor)
    per_pass = Counter()  # a module may run more than once a pass (a block's shared ReLU)
    handles = [
        m.register_forward_hook(lambda *a, n=n: per_pass.update([n])) for n, m in {**prefix, **suffix}.items()
    ]
    attributor.classifier(torch.rand(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    calls: dict[str, list[int]] = {name: [] for name in [*prefix, *suffix, "folded"]}

    def record(part):
        return lambda module, inputs, output: calls[part].append(inputs[0].shape[0])

    handles = [m.register_forward_hook(record(n)) for n, m in {**prefix, **suffix}.items()]
    if fuse:
        handles.append(attributor.fitting_suffix().register_forward_hook(record("folded")))
    try:
        attributor.explain(torch.rand(batch, 3, 64, 64))
    finally:
        attributor.fuse = True
        for handle in handles:
            handle.remove()
    assert prefix and suffix
    for name in prefix:
        assert calls[name] == [batch] * per_pass[name], name
    passes = [batch] + [batch * attributor.copies] * (attributor.steps + 1)
    for name in suffix:
        expected = [] if fuse else [size for size in passes for _ in range(per_pass[name])]
        assert calls[name] == expected, name
    assert calls["folded"] == (passes if fuse else [])
    assert all(p.grad is None for p in attributor.classifier.parameters())


@pytest.mark.parametrize(
    "target, message",
    [
        (6, r"class indices in \[0, 6\) for a classifier of 6 classes"),
        (torch.tensor([0, -1]), r"class indices in \[0, 6\)"),
        (torch.tensor([0, 1, 2]), "the batch has 2 images"),
        (torch.tensor([[0], [1]]), "the batch has 2 images"),
        (torch.tensor([0.0, 1.0]), "integer class indices"),
    ],
)
def test_bad_targets_are_clear_errors(attributor, target, message):
    with pytest.raises(ValueError, match=message):
        attributor(torch.rand(2, 3, 64, 64), target)


@pytest.mark.parametrize(
    "images, message",
    [
        ((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), r"floats in \[0, 1\].*torch.uint8"),
        (torch.rand(1, 3, 64, 64) * 255, r"floats in \[0, 1\].*got values in \[.*, 25\d"),
        (torch.rand(1, 3, 64, 64) - 0.5, r"floats in \[0, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), r"floats in \[0, 1\]"),
    ],
)
def test_images_outside_the_unit_range_are_clear_errors(attributor, images, message):
    with pytest.raises(ValueError, match=message):
        attributor(images)


def test_images_within_rounding_of_the_unit_range_pass(attributor):
    images = torch.rand(1, 3, 64, 64)
    images[0, 0, 0, 0], images[0, 1, 0, 0] = -1e-6, 1 + 1e-6
    assert torch.isfinite(attributor(images)).all()


@pytest.mark.gpu
def test_per_sample_on_cuda_matches_cpu_on_the_same_noise(attributor, monkeypatch):
    # TF32 convolutions (cuDNN allows them by default) would differ from the CPU's float32 by about 1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    images = torch.rand(2, 3, 64, 64)
    noise = torch.randn(attributor.steps, 2, attributor.copies, *attributor.shape)
    cpu = attributor.explain(images, noise=noise)
    cuda = copy.deepcopy(attributor).to("cuda")
    on_cuda = cuda.explain(images.cuda(), noise=noise.cuda())
    torch.testing.assert_close(on_cuda.heatmap.cpu(), cpu.heatmap, rtol=1e-3, atol=1e-5)
    # Without given noise the seeded generator draws on the device (it raised before: issue 3 on GPU).
    assert cuda.generator is not None and cuda.generator.device.type == "cuda"
    cuda.generator.manual_seed(0)
    first = cuda(images.cuda())
    cuda.generator.manual_seed(0)
    second = cuda(images.cuda())
    assert first.device.type == "cuda" and torch.equal(first, second)
    explanation = cuda.explain(images.cuda())
    torch.testing.assert_close(explanation.heatmap.sum((1, 2)), explanation.total_bits, rtol=1e-4, atol=1e-6)


def test_the_folded_suffix_gives_the_maps_of_the_classifiers_own_and_follows_its_weights(attributor):
    images = torch.rand(2, 3, 64, 64)
    noise = torch.randn(attributor.steps, 2, attributor.copies, *attributor.shape)
    folded = attributor.explain(images, noise=noise)
    attributor.fuse = False
    try:
        own = attributor.explain(images, noise=noise)
    finally:
        attributor.fuse = True
    torch.testing.assert_close(folded.heatmap, own.heatmap, rtol=1e-4, atol=1e-6)
    first = attributor.fitting_suffix()
    assert attributor.fitting_suffix() is first  # kept between calls
    fc = attributor.classifier.model.fc
    saved = fc.weight.clone()
    try:
        with torch.no_grad():
            fc.weight.mul_(2.0)  # an in-place change of the classifier: the copy is made again
        again = attributor.fitting_suffix()
        assert again is not first
        z = torch.rand(3, *attributor.shape)
        torch.testing.assert_close(again(z), attributor.split.suffix(z), rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            fc.weight.copy_(saved)
