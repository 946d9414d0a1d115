"""Transforms move the image, its boxes and its mask through one geometry."""

from __future__ import annotations

import numpy as np
import torch

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
