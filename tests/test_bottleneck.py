"""The bottleneck's formulas against slow, obvious re-implementations."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from readout.bottleneck import (
    FeatureStatistics,
    InformationBottleneck,
    blur,
    gaussian_kernel,
    information_map,
)
from readout.bottleneck import kl_divergence as bottleneck_kl


def fitted_statistics(data: torch.Tensor, **kwargs) -> FeatureStatistics:
    stats = FeatureStatistics(tuple(data.shape[1:]), **kwargs)
    stats.update(data)
    return stats


def test_kl_matches_torch_distributions_in_raw_units():
    torch.manual_seed(0)
    mu, sigma = torch.randn(5), torch.rand(5) + 0.1
    features, lam = torch.randn(5) * 2, torch.rand(5)
    # P(Z|R) = N(λR + (1 − λ)μ, ((1 − λ)σ)²) against the prior N(μ, σ²), paper eq. 2 and 5.
    expected = kl_divergence(Normal(lam * features + (1 - lam) * mu, (1 - lam) * sigma), Normal(mu, sigma))
    ours = bottleneck_kl((features - mu) / sigma, lam, 1 - lam)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_when_everything_is_noise():
    r = torch.randn(10)
    torch.testing.assert_close(bottleneck_kl(r, torch.zeros(10), torch.ones(10)), torch.zeros(10))


def test_gaussian_kernel_size_and_mass():
    for sigma, size in [(0.5, 3), (1.0, 5), (2.0, 9)]:
        kernel = gaussian_kernel(sigma)
        assert kernel.numel() == 2 * round(2 * sigma) + 1 == size
        assert kernel.sum().item() == pytest.approx(1.0)


def slow_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = gaussian_kernel(sigma).double()
    radius = kernel.numel() // 2
    b, c, h, w = x.shape

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for y in range(h):
        for xx in range(w):
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    weight = kernel[dy + radius] * kernel[dx + radius]
                    out[:, :, y, xx] += weight * x[:, :, reflect(y + dy, h), reflect(xx + dx, w)].double()
    return out.float()


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_blur_matches_slow_reflection_convolution(sigma):
    x = torch.rand(2, 3, 7, 6)
    torch.testing.assert_close(blur(x, sigma), slow_blur(x, sigma), rtol=1e-5, atol=1e-6)


def test_blur_of_complement_is_complement_of_blur():
    alpha = torch.randn(1, 2, 8, 8) * 5
    torch.testing.assert_close(
        blur(torch.sigmoid(-alpha), 1.0), 1 - blur(torch.sigmoid(alpha), 1.0), rtol=1e-5, atol=1e-6
    )


def test_blur_too_wide_for_map_is_clear_error():
    with pytest.raises(ValueError, match="too large"):
        blur(torch.rand(1, 1, 3, 3), 2.0)


def test_statistics_match_population_mean_and_std():
    data = torch.randn(40, 3, 4, 4) * 3 + 1
    stats = fitted_statistics(data)
    torch.testing.assert_close(stats.mean, data.mean(0))
    torch.testing.assert_close(stats.std, data.std(0, unbiased=False), rtol=1e-4, atol=1e-5)


def test_statistics_merge_equals_one_pass():
    data = torch.randn(30, 2, 3, 3)
    first, second = fitted_statistics(data[:11]), fitted_statistics(data[11:])
    first.merge(second)
    whole = fitted_statistics(data)
    for name in ("count", "total", "total_sq", "nonzero"):
        torch.testing.assert_close(getattr(first, name), getattr(whole, name))


def test_statistics_state_dict_round_trip():
    stats = fitted_statistics(torch.relu(torch.randn(20, 2, 3, 3)))
    loaded = FeatureStatistics((2, 3, 3))
    loaded.load_state_dict(stats.state_dict())
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.std, stats.std)
    assert torch.equal(loaded.active, stats.active)


def test_derived_statistics_are_kept_until_the_sums_change(monkeypatch):
    data = torch.relu(torch.randn(30, 2, 3, 3))
    stats = fitted_statistics(data[:10])
    mean, std, active = stats.mean, stats.std, stats.active
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or 1.0)
    assert stats.mean is mean and stats.std is std and stats.active is active
    assert not reads  # no host read of the count, which would stop a GPU stream every step
    monkeypatch.undo()

    def expected(part):
        return fitted_statistics(part).mean

    stats.update(data[10:20])
    torch.testing.assert_close(stats.mean, expected(data[:20]))
    stats.merge(fitted_statistics(data[20:]))
    torch.testing.assert_close(stats.mean, expected(data))
    stats.load_state_dict(fitted_statistics(data[:5]).state_dict())
    torch.testing.assert_close(stats.mean, expected(data[:5]))
    assert stats.double().mean.dtype == torch.float32 and stats.mean.device == stats.total.device


def test_dead_units_floor_std_and_count_as_inactive():
    data = torch.relu(torch.randn(50, 2, 2, 2))
    data[:, 0] = 0.0
    stats = fitted_statistics(data, min_std=0.05)
    assert torch.all(stats.std[0] == 0.05)
    assert not stats.active[0].any() and stats.active[1].all()
    bottleneck = InformationBottleneck(stats, sigma=0.0)
    z, kl = bottleneck(data[:4], torch.zeros(4, 2, 2, 2), torch.randn(4, 2, 2, 2))
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    assert torch.all(z[:, 0] == 0) and torch.all(kl[:, 0] == 0)


def test_empty_statistics_are_a_clear_error():
    with pytest.raises(RuntimeError, match="estimate"):
        _ = FeatureStatistics((1, 2, 2)).mean


def test_wrong_feature_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        FeatureStatistics((1, 2, 2)).update(torch.zeros(3, 1, 4, 4))


def test_noise_has_the_papers_distribution():
    torch.manual_seed(0)
    data = torch.randn(100, 1, 2, 2) * 2 + 3
    stats = fitted_statistics(data)
    bottleneck = InformationBottleneck(stats, sigma=0.0)
    features = data[:1]
    alpha = torch.full((1, 1, 2, 2), 0.3)
    lam = torch.sigmoid(alpha)
    z, _ = bottleneck(features, alpha, torch.randn(1, 20000, 1, 2, 2))
    expected_mean = lam * features + (1 - lam) * stats.mean
    torch.testing.assert_close(z.mean(0, keepdim=True), expected_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0, keepdim=True), (1 - lam) * stats.std, atol=0.02, rtol=0)


def test_alpha_large_lets_the_signal_through():
    data = torch.randn(10, 2, 4, 4)
    bottleneck = InformationBottleneck(fitted_statistics(data), sigma=1.0)
    z, kl = bottleneck(data, torch.full_like(data, 20.0), torch.randn_like(data))
    torch.testing.assert_close(z, data, atol=1e-5, rtol=0)
    assert torch.isfinite(kl).all() and (kl > 0).all()


def test_information_map_total_equals_bits_at_the_bottleneck():
    kl = torch.rand(3, 4, 5, 7)
    heatmap = information_map(kl, (40, 56))
    assert heatmap.shape == (3, 40, 56)
    torch.testing.assert_close(heatmap.sum((1, 2)), kl.sum((1, 2, 3)) / math.log(2))


def test_information_map_of_uniform_information_is_uniform():
    heatmap = information_map(torch.ones(1, 2, 4, 4), (16, 16))
    torch.testing.assert_close(heatmap, torch.full((1, 16, 16), 32 / math.log(2) / 256))


def slow_bilinear(image: list[list[float]], height: int, width: int) -> list[list[float]]:
    """Bilinear resize, pixel by pixel (align_corners=False): output pixel i samples the input at
    (i + 0.5)·h/H − 0.5, clamped to the first and last input pixel centres."""
    h, w = len(image), len(image[0])

    def source(i: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        position = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
        low = math.floor(position)
        return low, min(low + 1, size_in - 1), position - low

    out = []
    for i in range(height):
        y0, y1, wy = source(i, h, height)
        row = []
        for j in range(width):
            x0, x1, wx = source(j, w, width)
            top = (1 - wx) * image[y0][x0] + wx * image[y0][x1]
            bottom = (1 - wx) * image[y1][x0] + wx * image[y1][x1]
            row.append((1 - wy) * top + wy * bottom)
        out.append(row)
    return out


@pytest.mark.parametrize("size", [(13, 17), (9, 5)])
def test_information_map_is_bilinear_then_scaled_to_the_total(size):
    kl = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heatmap = information_map(kl, size)
    for b in range(2):
        bits = (kl[b].sum(0) / math.log(2)).tolist()
        resized = torch.tensor(slow_bilinear(bits, *size), dtype=torch.float64)
        expected = resized * (kl[b].sum() / math.log(2)) / resized.sum()
        torch.testing.assert_close(heatmap[b], expected, rtol=1e-12, atol=1e-12)
