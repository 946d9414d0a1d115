import math

import pytest
import torch
from torch import nn

from readout.metrics import Degradation, degradation_curves, degradation_score, tile_ranks, tile_sums
from readout.metrics.tiles import num_tiles

from .helpers import SIZE, linear_model, slow_tiles


def slow_tile_sums(attribution: torch.Tensor, tile: int) -> list[float]:
    return [
        sum(attribution[y, x].item() for y, x in pixels) for pixels in slow_tiles(*attribution.shape, tile)
    ]


def slow_curves(model, images, attributions, targets, tile, baseline):
    """One image and one step at a time: python's sorted is stable, so ties keep raster order."""
    morf, lerf = [], []
    for image, attribution, target in zip(images, attributions, targets, strict=True):
        pixels = slow_tiles(*attribution.shape, tile)
        sums = slow_tile_sums(attribution, tile)
        fill = (
            image.mean(dim=(1, 2))
            if baseline == "mean"
            else torch.full((3,), float(baseline), dtype=image.dtype)
        )
        curves = []
        for sign in (-1, 1):
            order = sorted(range(len(sums)), key=lambda t, sign=sign: sign * sums[t])
            curve = []
            for k in range(len(sums) + 1):
                degraded = image.clone()
                for t in order[:k]:
                    for y, x in pixels[t]:
                        degraded[:, y, x] = fill
                curve.append(model(degraded[None]).softmax(dim=1)[0, target].item())
            curves.append(curve)
        morf.append(curves[0])
        lerf.append(curves[1])
    return torch.tensor(morf, dtype=torch.float64), torch.tensor(lerf, dtype=torch.float64)


def tied_attributions(batch: int, seed: int = 2) -> torch.Tensor:
    """Small integers: tile sums are exact in float64 and many tie."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, SIZE, SIZE), generator=generator).double()


def test_tile_sums_match_loops_also_for_ragged_tiles():
    attribution = torch.randn(2, 10, 13, dtype=torch.float64)
    assert num_tiles(10, 13, 4) == 3 * 4
    for image in range(2):
        expected = torch.tensor(slow_tile_sums(attribution[image], 4), dtype=torch.float64)
        torch.testing.assert_close(tile_sums(attribution, 4)[image], expected)


def test_ties_keep_raster_order_in_both_directions():
    # Tile sums (raster order) [1, 3, 3, 0]: MoRF removes tiles 1, 2, 0, 3; LeRF removes 3, 0, 1, 2.
    attribution = torch.tensor([[1.0, 3.0], [3.0, 0.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1) / 4
    assert tile_ranks(attribution[None], 2, most_relevant_first=True).tolist() == [[2, 0, 1, 3]]
    assert tile_ranks(attribution[None], 2, most_relevant_first=False).tolist() == [[1, 2, 3, 0]]
    flat = torch.zeros(1, 4, 4)
    assert tile_ranks(flat, 2, True).tolist() == tile_ranks(flat, 2, False).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("baseline", ["mean", "zero", 0.3])
def test_curves_match_the_slow_reference(model, images, baseline):
    attributions = tied_attributions(len(images))
    targets = torch.tensor([0, 2, 3])
    morf, lerf = degradation_curves(
        model, images, attributions, targets, tile=4, baseline=baseline, chunk_size=7
    )
    slow_morf, slow_lerf = slow_curves(
        model, images, attributions, targets, 4, 0.0 if baseline == "zero" else baseline
    )
    assert morf.shape == lerf.shape == (3, 4 * 4 + 1)
    torch.testing.assert_close(morf, slow_morf, rtol=0, atol=1e-12)
    torch.testing.assert_close(lerf, slow_lerf, rtol=0, atol=1e-12)


def test_curves_share_their_ends_and_default_to_the_predicted_class(model, images):
    attributions = torch.randn(len(images), SIZE, SIZE, dtype=torch.float64)
    morf, lerf = degradation_curves(model, images, attributions, None, tile=8)
    predicted = model(images).softmax(dim=1).amax(dim=1)
    torch.testing.assert_close(morf[:, 0], predicted)
    assert torch.equal(morf[:, 0], lerf[:, 0]) and torch.equal(morf[:, -1], lerf[:, -1])


def test_exact_attribution_gives_morf_below_lerf(images):
    # Two classes, linear: removing a tile changes the logit difference by exactly its attribution.
    model = linear_model(classes=2)
    weight = model[1].weight.view(2, 3, SIZE, SIZE)
    baseline = images.mean(dim=(2, 3), keepdim=True)
    attributions = ((weight[0] - weight[1]) * (images - baseline)).sum(dim=1)
    morf, lerf = degradation_curves(model, images, attributions, torch.zeros(3, dtype=torch.long), tile=4)
    assert (morf <= lerf + 1e-12).all()
    assert (morf[:, 1:-1] < lerf[:, 1:-1]).any()


def slow_areas(morf, lerf, top1):
    """Each image's area between its scaled LeRF and MoRF curves (eq. 8, t1 and b over the set)."""
    t1, b = sum(top1.tolist()) / len(top1), sum(morf[:, -1].tolist()) / len(morf)
    steps = morf.shape[1] - 1
    areas = []
    for most, least in zip(morf.tolist(), lerf.tolist(), strict=True):
        diff = [((li - b) - (mi - b)) / (t1 - b) for mi, li in zip(most, least, strict=True)]
        areas.append(sum((diff[k] + diff[k + 1]) / 2 / steps for k in range(steps)))
    return areas


def slow_score(morf, lerf, top1):
    areas = slow_areas(morf, lerf, top1)
    return sum(areas) / len(areas)


def random_curves(batch: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    morf, lerf = torch.rand(2, batch, steps + 1, generator=generator, dtype=torch.float64)
    lerf[:, -1] = morf[:, -1]
    top1 = 0.5 + 0.5 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return morf, lerf, top1


def test_score_is_eq8_area_between_scaled_curves():
    morf, lerf, top1 = random_curves(5, 9, seed=3)
    summary = degradation_score(morf, lerf, top1)
    assert summary["score"].item() == pytest.approx(slow_score(morf, lerf, top1), abs=1e-12)
    assert summary["morf"][-1].item() == pytest.approx(0.0)
    assert summary["fraction"].tolist() == [k / 9 for k in range(10)]


def test_standard_error_is_that_of_the_per_image_areas():
    morf, lerf, top1 = random_curves(7, 5, seed=4)
    areas = slow_areas(morf, lerf, top1)
    mean = sum(areas) / len(areas)
    expected = math.sqrt(sum((a - mean) ** 2 for a in areas) / (len(areas) - 1) / len(areas))
    metric = Degradation(num_tiles=5)
    metric.update(morf[:3], lerf[:3], top1[:3])
    metric.update(morf[3:], lerf[3:], top1[3:])
    result = metric.compute()
    assert result["score"].item() == pytest.approx(mean, abs=1e-12)
    assert result["score_se"].item() == pytest.approx(expected, rel=1e-9)
    one = Degradation(num_tiles=5)
    one.update(morf[:1], lerf[:1], top1[:1])
    assert math.isnan(one.compute()["score_se"].item())


def test_metric_merged_over_two_ranks_equals_one_pass():
    morf, lerf, top1 = random_curves(6, 4, seed=4)
    whole = Degradation(num_tiles=4)
    whole.update(morf, lerf, top1)
    ranks = [Degradation(num_tiles=4), Degradation(num_tiles=4)]
    ranks[0].update(morf[:2], lerf[:2], top1[:2])
    ranks[1].update(morf[2:], lerf[2:], top1[2:])
    ranks[0].merge_state(ranks[1])
    merged, one_pass = ranks[0].compute(), whole.compute()
    for key in one_pass:
        torch.testing.assert_close(merged[key], one_pass[key])
    assert one_pass["score"].item() == pytest.approx(slow_score(morf, lerf, top1), abs=1e-12)
    assert one_pass["count"].item() == 6


def test_wrong_shapes_are_refused(model, images):
    with pytest.raises(ValueError, match="attributions must be"):
        degradation_curves(model, images, torch.zeros(3, 8, 8), None, tile=4)
    with pytest.raises(ValueError, match=r"\(B, T \+ 1\)"):
        Degradation(num_tiles=3).update(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2))


def test_model_mode_and_gradients_are_untouched(images):
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * SIZE * SIZE, 2)).double().eval()
    morf, _ = degradation_curves(model, images, torch.zeros(3, SIZE, SIZE), None, tile=8)
    assert not model.training and not morf.requires_grad
