import math

import pytest
import torch

from readout.metrics import (
    LOCALISATION_SCORES,
    Localisation,
    boundary_bands,
    boundary_share,
    boundary_sharpness,
    box_ratio,
    localisation_scores,
    mass_inside,
    top_n_ratio,
)


def slow_top_n_ratio(attribution: torch.Tensor, region: torch.Tensor) -> float:
    height, width = attribution.shape
    pixels = [(y, x) for y in range(height) for x in range(width)]
    ranked = sorted(pixels, key=lambda p: -attribution[p].item())  # stable: ties in raster order
    n = sum(bool(region[p]) for p in pixels)
    return sum(bool(region[p]) for p in ranked[:n]) / n


def slow_mass_inside(attribution: torch.Tensor, region: torch.Tensor) -> float:
    values = attribution.flatten().tolist()
    inside = region.flatten().tolist()
    total = sum(max(v, 0.0) for v in values)
    return sum(max(v, 0.0) for v, i in zip(values, inside, strict=True) if i) / total


def slow_bands(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inner: mask pixels with a non-mask image pixel within chessboard distance width; outer: vice versa."""
    height, size = mask.shape
    inner, outer = torch.zeros_like(mask), torch.zeros_like(mask)
    for y in range(height):
        for x in range(size):
            near = [
                bool(mask[v, u])
                for v in range(max(0, y - width), min(height, y + width + 1))
                for u in range(max(0, x - width), min(size, x + width + 1))
            ]
            if mask[y, x] and not all(near):
                inner[y, x] = True
            if not mask[y, x] and any(near):
                outer[y, x] = True
    return inner, outer


def box(batch: int, top: int, left: int, side: int, size: int = 16) -> torch.Tensor:
    region = torch.zeros(batch, size, size, dtype=torch.bool)
    region[:, top : top + side, left : left + side] = True
    return region


def test_top_n_ratio_matches_loops_with_ties():
    generator = torch.Generator().manual_seed(0)
    attributions = torch.randint(0, 3, (4, 9, 7), generator=generator).float()
    regions = torch.rand(4, 9, 7, generator=generator) < 0.3
    ratios = top_n_ratio(attributions, regions)
    for i in range(4):
        assert ratios[i].item() == pytest.approx(slow_top_n_ratio(attributions[i], regions[i]), abs=1e-7)


def test_ties_are_broken_by_raster_order():
    flat = torch.zeros(1, 4, 4)
    first_row, last_row = torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool)
    first_row[:, 0], last_row[:, -1] = True, True
    assert top_n_ratio(flat, first_row).item() == 1.0
    assert top_n_ratio(flat, last_row).item() == 0.0


def test_perfect_attribution_scores_one_and_reversed_zero():
    boxes = box(2, 3, 5, 4)
    ratio, valid = box_ratio(boxes.float(), boxes)
    assert ratio.tolist() == [1.0, 1.0] and valid.all()
    ratio, _ = box_ratio((~boxes).float(), boxes)
    assert ratio.tolist() == [0.0, 0.0]
    assert mass_inside(boxes.float(), boxes).tolist() == [1.0, 1.0]


def test_only_boxes_under_a_third_of_the_image_are_valid():
    boxes = torch.cat([box(1, 0, 0, 9), box(1, 0, 0, 10), torch.zeros(1, 16, 16, dtype=torch.bool)])
    _, valid = box_ratio(torch.rand(3, 16, 16), boxes)  # 81/256 = 0.316, 100/256 = 0.39, empty
    assert valid.tolist() == [True, False, False]


def test_mass_inside_counts_positive_mass_only():
    generator = torch.Generator().manual_seed(1)
    attributions = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    regions = torch.rand(3, 6, 5, generator=generator) < 0.5
    shares = mass_inside(attributions, regions)
    for i in range(3):
        assert shares[i].item() == pytest.approx(slow_mass_inside(attributions[i], regions[i]), abs=1e-12)
    assert math.isnan(mass_inside(-torch.ones(1, 4, 4), box(1, 0, 0, 2, 4)).item())


@pytest.mark.parametrize("width", [1, 2])
def test_boundary_bands_match_loops_and_ignore_the_image_border(width):
    generator = torch.Generator().manual_seed(2)
    masks = torch.zeros(2, 10, 11, dtype=torch.bool)
    masks[0, 2:7, 3:9] = True
    masks[1] = torch.rand(10, 11, generator=generator) < 0.4
    masks[1, :, 0] = True  # touches the left border
    inner, outer = boundary_bands(masks, width)
    for i in range(2):
        slow_inner, slow_outer = slow_bands(masks[i], width)
        assert torch.equal(inner[i], slow_inner) and torch.equal(outer[i], slow_outer)
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    assert not any(band.any() for band in boundary_bands(full, width))


def test_boundary_sharpness_is_one_when_sharp_and_a_half_when_spread_evenly():
    mask = box(1, 4, 4, 6)
    assert boundary_sharpness(mask.float(), mask, width=2).item() == 1.0
    inner, outer = slow_bands(mask[0], 2)
    uniform = torch.ones(1, 16, 16)
    expected = inner.sum().item() / (inner.sum().item() + outer.sum().item())
    assert boundary_sharpness(uniform, mask, width=2).item() == pytest.approx(expected)
    band = (inner | outer)[None].float()
    assert boundary_sharpness(band, mask, 2).item() == pytest.approx(expected)
    assert boundary_share(band, mask, 2).item() == 1.0


def test_scores_are_nan_where_they_do_not_apply():
    attributions = torch.rand(3, 16, 16)
    boxes = torch.cat([box(1, 0, 0, 4), box(1, 0, 0, 12), box(1, 2, 2, 5)])
    scores = localisation_scores(attributions, boxes, boxes, torch.tensor([True, True, False]))
    assert set(scores) == set(LOCALISATION_SCORES)
    assert scores["box_ratio"].isnan().tolist() == [False, True, False]
    assert scores["box_mass"].isnan().tolist() == [False, True, False]
    assert scores["mask_ratio"].isnan().tolist() == [False, False, True]
    no_masks = localisation_scores(attributions, boxes)
    assert no_masks["boundary_sharpness"].isnan().all() and not no_masks["box_ratio"][0].isnan()


def test_metric_merged_over_two_ranks_equals_one_pass():
    generator = torch.Generator().manual_seed(3)
    attributions = torch.randn(6, 16, 16, generator=generator)
    boxes = torch.cat([box(1, i, i, 3 + 2 * i) for i in range(6)])  # the two largest are invalid
    masks, has_mask = boxes.clone(), torch.tensor([True, False, True, True, False, True])
    whole = Localisation()
    whole.update(attributions, boxes, masks, has_mask)
    ranks = [Localisation(), Localisation()]
    ranks[0].update(attributions[:4], boxes[:4], masks[:4], has_mask[:4])
    ranks[1].update(attributions[4:], boxes[4:], masks[4:], has_mask[4:])
    ranks[0].merge_state(ranks[1])
    merged, one_pass = ranks[0].compute(), whole.compute()
    for key in one_pass:
        torch.testing.assert_close(merged[key], one_pass[key])
    assert one_pass["box_ratio_count"].item() == 4 and one_pass["mask_ratio_count"].item() == 4
    ratios, valid = box_ratio(attributions, boxes)
    assert one_pass["box_ratio"].item() == pytest.approx(ratios[valid].double().mean().item())
