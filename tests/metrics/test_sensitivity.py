import math

import pytest
import torch

from readout.metrics import (
    SensitivityN,
    correlations_from_drops,
    log_spaced_counts,
    random_tile_masks,
    sensitivity_drops,
    sensitivity_n,
    sensitivity_n_correlations,
)

from .helpers import SIZE, slow_pearson, slow_tiles


def slow_correlations(model, images, attributions, targets, tile, masks):
    """Loops over images, n, masks and pixels; masks (N, M, T) as drawn by random_tile_masks."""
    pixels = slow_tiles(SIZE, SIZE, tile)
    result = []
    for image, attribution, target in zip(images, attributions, targets, strict=True):
        original = model(image[None])[0, target].item()
        row = []
        for sets in masks:
            mass, drops = [], []
            for removed in sets:
                degraded = image.clone()
                total = 0.0
                for t in range(len(pixels)):
                    if removed[t]:
                        for y, x in pixels[t]:
                            degraded[:, y, x] = 0.0
                            total += attribution[y, x].item()
                mass.append(total)
                drops.append(original - model(degraded[None])[0, target].item())
            row.append(slow_pearson(mass, drops))
        result.append(row)
    return torch.tensor(result, dtype=torch.float64)


def test_log_spaced_counts_span_one_to_eighty_percent():
    counts = log_spaced_counts(784, points=16)
    assert counts[0] == 1 and counts[-1] == int(0.8 * 784)
    assert (counts[1:] > counts[:-1]).all()
    assert log_spaced_counts(4).tolist() == [1, 2, 3]


def test_masks_are_seeded_exact_and_independent_of_the_other_ns():
    masks = random_tile_masks(torch.tensor([1, 3, 7]), num_tiles=16, num_masks=5, seed=0)
    assert masks.shape == (3, 5, 16)
    assert masks.sum(dim=2).tolist() == [[1] * 5, [3] * 5, [7] * 5]
    assert torch.equal(masks, random_tile_masks(torch.tensor([1, 3, 7]), 16, 5, seed=0))
    assert torch.equal(masks[1], random_tile_masks(torch.tensor([3]), 16, 5, seed=0)[0])
    assert not torch.equal(masks, random_tile_masks(torch.tensor([1, 3, 7]), 16, 5, seed=1))


def test_correlations_match_the_slow_reference(model, images):
    attributions = torch.randn(len(images), SIZE, SIZE, generator=torch.Generator().manual_seed(5)).double()
    ns = torch.tensor([1, 4, 9])
    targets = torch.tensor([1, 0, 3])
    got_ns, correlations = sensitivity_n_correlations(
        model, images, attributions, targets, tile=4, ns=ns, num_masks=6, seed=7, chunk_size=5
    )
    masks = random_tile_masks(ns, 16, 6, seed=7)
    expected = slow_correlations(model, images, attributions, targets, 4, masks)
    assert got_ns.tolist() == [1, 4, 9] and correlations.shape == (3, 3)
    torch.testing.assert_close(correlations, expected, rtol=0, atol=1e-10)


def test_drops_shared_by_several_maps_match_the_slow_reference_for_the_predicted_class(model, images):
    # The evaluation harness runs the forward passes once and scores every method's map against them.
    ns = torch.tensor([2, 5])
    masks, drops = sensitivity_drops(model, images, None, tile=4, ns=ns, num_masks=4, seed=3, chunk_size=7)
    assert torch.equal(masks, random_tile_masks(ns, 16, 4, seed=3)) and drops.shape == (3, 2, 4)
    predicted = model(images).argmax(dim=1)
    generator = torch.Generator().manual_seed(11)
    for _ in range(2):
        attributions = torch.randn(len(images), SIZE, SIZE, generator=generator).double()
        expected = slow_correlations(model, images, attributions, predicted, 4, masks)
        got = correlations_from_drops(attributions, 4, masks, drops)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_exact_attribution_correlates_perfectly(model, images):
    # Linear model, zero baseline: the logit drop is exactly the removed gradient x input.
    targets = torch.tensor([0, 1, 2])
    weight = model[1].weight.view(4, 3, SIZE, SIZE)[targets]
    attributions = (weight * images).sum(dim=1)
    ns, curve = sensitivity_n(
        model, images, attributions, targets, tile=4, ns=torch.tensor([1, 5, 16]), num_masks=8
    )
    assert curve[:2].tolist() == pytest.approx([1.0, 1.0])
    assert math.isnan(curve[2].item())  # all 16 tiles removed by every mask: undefined


def test_metric_merged_over_two_ranks_equals_one_pass():
    correlations = torch.rand(5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    correlations[1, 2] = float("nan")
    ns = torch.tensor([1, 2, 4])
    whole, ranks = SensitivityN(ns), [SensitivityN(ns), SensitivityN(ns)]
    whole.update(correlations)
    ranks[0].update(correlations[:3])
    ranks[1].update(correlations[3:])
    ranks[0].merge_state(ranks[1])
    merged, one_pass = ranks[0].compute(), whole.compute()
    for key in one_pass:
        torch.testing.assert_close(merged[key], one_pass[key])
    torch.testing.assert_close(one_pass["correlation"], correlations.nanmean(dim=0))
    assert one_pass["count"].tolist() == [5, 5, 4] and one_pass["n"].tolist() == [1, 2, 4]
