"""Transforms move the image, its boxes and its mask through one geometry."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors

from readout.data.format import ShardSample
from readout.data.synthetic import make_sample
from readout.data.transforms import eval_transform, train_transform, transform_sample


def _left_square_sample(size: int = 32) -> ShardSample:
    image = np.zeros((size, size, 3), np.uint8)
    image[8:16, 2:10] = 255
    mask = image[..., 0] > 0
    return ShardSample("left", image, 2, "two", [(2.0, 8.0, 10.0, 16.0)], mask)


def test_a_flip_moves_image_box_and_mask_together() -> None:
    sample = _left_square_sample()
    flip = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    out = transform_sample(sample, flip)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:16, 22:30] = True
    assert torch.equal(out["box_mask"], expected)
    assert torch.equal(out["mask"], expected)
    assert torch.equal(out["image"][0] > 0.5, expected)
    assert out["label"].item() == 2 and out["has_mask"].item() and out["key"] == "left"


def test_eval_identity_keeps_everything() -> None:
    sample = _left_square_sample()
    out = transform_sample(sample, eval_transform(None, None))
    assert torch.equal(out["image"], torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255)
    assert torch.equal(out["mask"], torch.from_numpy(sample.mask))
    assert torch.equal(out["box_mask"], out["mask"])


def test_resize_and_center_crop_keep_mask_inside_box() -> None:
    for index in range(10):
        synthetic = make_sample(0, index, 64)
        sample = ShardSample(
            synthetic.key, synthetic.image, synthetic.label, "", [synthetic.bbox], synthetic.mask
        )
        out = transform_sample(sample, eval_transform(resize=40, crop=32))
        assert out["image"].shape == (3, 32, 32)
        if out["mask"].any():
            inside = (out["mask"] & out["box_mask"]).sum() / out["mask"].sum()
            assert inside >= 0.9  # nearest-neighbour mask vs rasterised box differ at most at the border


def test_random_resized_crop_gives_the_asked_size_and_consistent_masks() -> None:
    synthetic = make_sample(1, 0, 64)
    sample = ShardSample(
        synthetic.key, synthetic.image, synthetic.label, "", [synthetic.bbox], synthetic.mask
    )
    torch.manual_seed(0)
    for _ in range(5):
        out = transform_sample(sample, train_transform(48, scale=(0.3, 1.0)))
        assert out["image"].shape == (3, 48, 48) and out["mask"].shape == out["box_mask"].shape == (48, 48)
        if out["mask"].sum() > 20:
            assert (out["mask"] & out["box_mask"]).sum() / out["mask"].sum() >= 0.9


def test_a_sample_without_mask_or_box_gets_all_false() -> None:
    sample = ShardSample("plain", np.full((20, 30, 3), 9, np.uint8), 0, "zero", [], None)
    out = transform_sample(sample, eval_transform(resize=16, crop=16))
    assert out["image"].shape == (3, 16, 16)
    assert not out["mask"].any() and not out["box_mask"].any() and not out["has_mask"].item()


def test_resize_256_and_center_crop_224_move_box_and_mask_as_computed_by_hand() -> None:
    # 400 x 300 (W x H): Resize(256) scales the shorter side by 256/300, the longer to int(256 * 400 / 300)
    # = 341; CenterCrop(224) then cuts round((256 - 224) / 2) = 16 rows and round((341 - 224) / 2) = 58
    # columns (58.5 rounds to even) from the top and the left.
    width, height = 400, 300
    mask = np.zeros((height, width), bool)
    mask[80:220, 120:290] = True
    boxes = [(100.0, 75.0, 300.0, 225.0), (0.0, 0.0, 50.0, 40.0)]
    image = np.zeros((height, width, 3), np.uint8)
    transform = eval_transform(resize=256, crop=224)

    moved = transform(
        tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(height, width)),
    )
    sx, sy = 341 / 400, 256 / 300

    def clamp(value: float) -> float:  # torchvision clamps boxes to the crop
        return min(max(value, 0.0), 224.0)

    by_hand = [
        [clamp(x0 * sx - 58), clamp(y0 * sy - 16), clamp(x1 * sx - 58), clamp(y1 * sy - 16)]
        for x0, y0, x1, y1 in boxes
    ]
    torch.testing.assert_close(moved.as_subclass(torch.Tensor), torch.tensor(by_hand))
    assert by_hand == [[27.25, 48.0, 197.75, 176.0], [0.0, 0.0, 0.0, 40 * sy - 16]]  # the second is cut off

    out = transform_sample(ShardSample("wide", image, 1, "one", boxes, mask), transform)
    expected_box = torch.zeros(224, 224, dtype=torch.bool)
    expected_box[48:176, 27:198] = True  # pixel centres c + 0.5 in [27.25, 197.75), r + 0.5 in [48, 176)
    assert torch.equal(out["box_mask"], expected_box)
    # Masks are resized by nearest neighbour: output pixel (r, c) of the crop shows source pixel
    # (floor((r + 16) * 300 / 256), floor((c + 58) * 400 / 341)).
    expected_mask = torch.zeros(224, 224, dtype=torch.bool)
    for r in range(224):
        for c in range(224):
            expected_mask[r, c] = bool(mask[(r + 16) * 300 // 256, (c + 58) * 400 // 341])
    assert torch.equal(out["mask"], expected_mask)
    rows, cols = expected_mask.any(1).nonzero(), expected_mask.any(0).nonzero()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (53, 171, 45, 189)
