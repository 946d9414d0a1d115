import math

import numpy as np
import pytest
import torch

from readout.metrics import normalise_map, pearson, spearman, ssim
from readout.metrics.similarity import average_ranks

from .helpers import slow_pearson


def slow_ranks(values: list[float]) -> list[float]:
    """0-based ranks, ties get the mean of the positions they occupy."""
    return [sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) - 1) / 2 for v in values]


def slow_ssim(a: torch.Tensor, b: torch.Tensor, weights: list[list[float]], sample: bool = True) -> float:
    """skimage's structural_similarity, window by window, over windows fully inside the image."""
    size = len(weights)
    n = size * size
    norm = n / (n - 1) if sample else 1.0
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for top in range(a.shape[0] - size + 1):
        for left in range(a.shape[1] - size + 1):
            cells = [(top + i, left + j, weights[i][j]) for i in range(size) for j in range(size)]
            mx = sum(w * a[y, x].item() for y, x, w in cells)
            my = sum(w * b[y, x].item() for y, x, w in cells)
            vx = norm * (sum(w * a[y, x].item() ** 2 for y, x, w in cells) - mx * mx)
            vy = norm * (sum(w * b[y, x].item() ** 2 for y, x, w in cells) - my * my)
            cxy = norm * (sum(w * a[y, x].item() * b[y, x].item() for y, x, w in cells) - mx * my)
            scores.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return sum(scores) / len(scores)


def test_pearson_matches_the_formula_and_is_nan_for_constants():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 20, generator=generator, dtype=torch.float64)
    r = pearson(x, y)
    for i in range(3):
        assert r[i].item() == pytest.approx(slow_pearson(x[i].tolist(), y[i].tolist()), abs=1e-12)
    assert pearson(torch.full((1, 5), 0.1), torch.rand(1, 5)).isnan().all()


def test_average_ranks_and_spearman_match_loops_with_ties():
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (2, 5, 6), generator=generator).double()
    b = torch.randint(0, 4, (2, 5, 6), generator=generator).double()
    ranks = average_ranks(a.flatten(1))
    rho = spearman(a, b)
    for i in range(2):
        expected_ranks = slow_ranks(a[i].flatten().tolist())
        assert ranks[i].tolist() == pytest.approx(expected_ranks)
        expected = slow_pearson(expected_ranks, slow_ranks(b[i].flatten().tolist()))
        assert rho[i].item() == pytest.approx(expected, abs=1e-12)


def test_spearman_of_a_map_with_itself_is_one():
    a = torch.randn(2, 8, 8)
    assert spearman(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert spearman(a, a.exp()).tolist() == pytest.approx([1.0, 1.0])  # rank-based
    assert spearman(a, -a).tolist() == pytest.approx([-1.0, -1.0])


def test_normalise_map_clamps_to_percentiles_like_numpy():
    maps = torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    normalised = normalise_map(maps)
    for i in range(2):
        values = maps[i].numpy()
        lo, hi = np.percentile(values, 1), np.percentile(values, 99)
        expected = (np.clip(values, lo, hi) - lo) / (hi - lo)
        np.testing.assert_allclose(normalised[i].numpy(), expected, atol=1e-12)
    assert normalised.min() == 0 and normalised.max() == 1
    assert normalise_map(torch.full((1, 4, 4), 3.0)).eq(0).all()


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_matches_the_windowed_formula(gaussian):
    generator = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 2, 9, 8, generator=generator, dtype=torch.float64)
    b = 0.5 * a + 0.5 * b
    if gaussian:
        line = [math.exp(-((i - 2) ** 2) / (2 * 1.5**2)) for i in range(5)]
        total = sum(line) ** 2
        weights = [[p * q / total for q in line] for p in line]
    else:
        weights = [[1 / 25] * 5 for _ in range(5)]
    scores = ssim(a, b, window_size=5, gaussian=gaussian)
    for i in range(2):
        assert scores[i].item() == pytest.approx(slow_ssim(a[i], b[i], weights), abs=1e-12)


def test_ssim_of_a_map_with_itself_is_one():
    a = normalise_map(torch.randn(3, 12, 12))
    assert ssim(a, a).tolist() == pytest.approx([1.0] * 3)
    assert (ssim(a, 1 - a) < 0.5).all()
