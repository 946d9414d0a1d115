"""Train and eval transforms that move an image, its boxes and its mask through the same geometry.

Built from ``torchvision.transforms.v2`` with ``tv_tensors`` (``Image``, ``BoundingBoxes``, ``Mask``), so
a crop, resize or flip is applied to all three alike; the boxes are rasterised into ``box_mask`` only
after the transform (see :func:`readout.data.format.box_mask`).

- train: ``RandomResizedCrop(size, scale, ratio)`` + horizontal flip.
- eval: ``Resize(resize)`` (shorter side) + ``CenterCrop(crop)``; ImageNet uses 256 / 224, the
  synthetic set its own size (``eval_transform(None, None)`` is the identity).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from readout.data.format import ShardSample, box_mask


def train_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
) -> v2.Compose:
    """RandomResizedCrop to ``size`` x ``size`` px and a horizontal flip with probability ``flip``."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
            v2.RandomHorizontalFlip(flip),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(resize: int | None = 256, crop: int | None = 224) -> v2.Compose:
    """Resize the shorter side to ``resize`` px, then center-crop ``crop`` x ``crop``; None skips a step."""
    steps: list[v2.Transform] = []
    if resize is not None:
        steps.append(v2.Resize(resize, antialias=True))
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def transform_sample(
    sample: ShardSample, transform: v2.Transform, teacher: np.ndarray | None = None
) -> dict[str, Any]:
    """A decoded sample -> one element of a batch (see :mod:`readout.data.shards` for the format).

    image: (3, H, W) float32 in [0, 1]; label: int64 scalar; box_mask, mask: (H, W) bool;
    has_mask: bool scalar; key: str. A sample without mask gets an all-False one.
    ``teacher``: a map (h, w) over the whole image (:mod:`readout.tools.teacher`), resized to the image's
    canvas and moved through the same geometry, then ``teacher``: (1, H, W) float32 of the element.
    """
    height, width = sample.image.shape[:2]
    image = tv_tensors.Image(torch.from_numpy(sample.image).permute(2, 0, 1))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
        format="XYXY",
        canvas_size=(height, width),
    )
    has_mask = sample.mask is not None
    mask_array = (
        torch.from_numpy(sample.mask)
        if sample.mask is not None
        else torch.zeros(height, width, dtype=torch.bool)
    )
    mask = tv_tensors.Mask(mask_array.to(torch.uint8)[None])
    extra: dict[str, Any] = {}
    if teacher is not None:
        canvas = F.interpolate(
            torch.from_numpy(teacher)[None, None].float(), size=(height, width), mode="bilinear"
        )
        # an Image, not a Mask: crops resize it bilinearly; ToDtype leaves a float32 image as it is
        image, boxes, mask, map_ = transform(image, boxes, mask, tv_tensors.Image(canvas[0]))
        extra["teacher"] = map_.as_subclass(torch.Tensor)
    else:
        image, boxes, mask = transform(image, boxes, mask)
    if image.dtype != torch.float32:
        raise ValueError("the transform must end in v2.ToDtype(torch.float32, scale=True)")
    out_height, out_width = image.shape[-2:]
    return {
        "image": image.as_subclass(torch.Tensor),
        "label": torch.tensor(sample.label, dtype=torch.int64),
        "box_mask": box_mask(boxes.as_subclass(torch.Tensor), out_height, out_width),
        "mask": mask.as_subclass(torch.Tensor)[0] > 0,
        "has_mask": torch.tensor(has_mask),
        "key": sample.key,
        **extra,
    }
