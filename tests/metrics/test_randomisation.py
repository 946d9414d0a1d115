import pytest
import torch
from torch import nn

from readout.metrics import (
    Randomisation,
    cascading_randomisation,
    randomisation_curve,
    randomisation_labels,
    reinitialise,
)

from .helpers import SIZE, tiny_classifier


def gradient_times_input(model: nn.Module):
    def attribute(images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        images = images.detach().requires_grad_(True)
        logits = model(images)
        target = logits.argmax(dim=1) if target is None else target
        (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), images)
        return (gradient * images).sum(dim=1)

    return attribute


def parameters_of(stage: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.parameters()]


def test_stages_are_reinitialised_cumulatively_from_the_last_on_a_copy():
    model = tiny_classifier()
    before = {i: parameters_of(model.model[i]) for i in (0, 2, 6)}
    rng_state = torch.get_rng_state()
    steps = []
    for label, randomised in cascading_randomisation(model, seed=0):
        assert randomised is not model
        changed = [
            i
            for i in (0, 2, 6)
            if not all(
                torch.equal(a, b) for a, b in zip(parameters_of(randomised.model[i]), before[i], strict=True)
            )
        ]
        steps.append((label, changed))
    assert steps == [("original", []), ("fc", [6]), ("2", [2, 6]), ("conv1", [0, 2, 6])]
    assert torch.equal(torch.get_rng_state(), rng_state)
    for i in (0, 2, 6):
        assert all(torch.equal(a, b) for a, b in zip(parameters_of(model.model[i]), before[i], strict=True))
    assert randomisation_labels(model) == ["original", "fc", "2", "conv1"]


def test_new_weights_depend_on_the_seed_only():
    def last_weights(seed: int) -> list[torch.Tensor]:
        *_, (_, randomised) = cascading_randomisation(tiny_classifier(), seed)
        return parameters_of(randomised)

    torch.manual_seed(123)
    first = last_weights(0)
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(first, last_weights(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, last_weights(1), strict=True))


def test_a_parameter_without_initialiser_is_an_error():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = nn.Parameter(torch.ones(1))

    with pytest.raises(TypeError, match="factor"):
        reinitialise(nn.Sequential(nn.Linear(2, 2), Scale()))


def test_curve_starts_at_one_for_a_deterministic_attributor_and_drops():
    model = tiny_classifier()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curve = randomisation_curve(model, images, gradient_times_input, seed=0)
    assert curve.labels == ["original", "fc", "2", "conv1"]
    assert curve.ssim.shape == curve.spearman.shape == (2, 4)
    assert curve.ssim[:, 0].tolist() == pytest.approx([1.0, 1.0])
    assert curve.spearman[:, 0].tolist() == pytest.approx([1.0, 1.0])
    assert (curve.ssim[:, -1] < 0.9).all()
    scaled = randomisation_curve(model, images, lambda m: lambda x, t: 10 * gradient_times_input(m)(x, t))
    torch.testing.assert_close(scaled.ssim, curve.ssim)  # maps are normalised before SSIM


def test_sign_invariance_undoes_a_flipped_map():
    model = tiny_classifier()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = {"n": 0}

    def flipping(m: nn.Module):
        calls["n"] += 1
        sign = 1.0 if calls["n"] == 1 else -1.0  # the original map keeps its sign, every later one flips
        return lambda x, t: sign * gradient_times_input(m)(x, t)

    plain = randomisation_curve(model, images, flipping)
    calls["n"] = 0
    invariant = randomisation_curve(model, images, flipping, sign_invariant=True)
    assert plain.spearman[:, 0].tolist() == pytest.approx([-1.0, -1.0])
    assert invariant.spearman[:, 0].tolist() == pytest.approx([1.0, 1.0])
    assert invariant.ssim[:, 0].tolist() == pytest.approx([1.0, 1.0])


def test_metric_merged_over_two_ranks_equals_one_pass():
    model = tiny_classifier()
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = randomisation_labels(model)
    halves = [randomisation_curve(model, part, gradient_times_input) for part in images.split(2)]
    whole = randomisation_curve(model, images, gradient_times_input)
    one_pass, ranks = Randomisation(labels), [Randomisation(labels), Randomisation(labels)]
    one_pass.update(whole)
    for rank, half in zip(ranks, halves, strict=True):
        rank.update(half)
    ranks[0].merge_state(ranks[1])
    merged, expected = ranks[0].compute(), one_pass.compute()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])
    torch.testing.assert_close(expected["ssim"], whole.ssim.double().mean(dim=0))
    assert expected["count"].tolist() == [4.0] * 4
