"""Training images decoded on the GPU: loader workers read only JPEG headers and draw the random crops,
the batch's device decodes the bytes in one call (nvJPEG on CUDA) and crops them. Pure torch.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from readout.data.format import check_sample, decode_jpegs
from readout.data.shards import ShardSpec, resolve_shards
from readout.data.transforms import train_transform


@dataclass(frozen=True)
class RawJpeg:
    """A training sample whose decode is left to the batch's device: its JPEG bytes, label and (H, W)."""

    key: str
    data: bytes
    label: int
    size: tuple[int, int]


def raw_jpeg(raw: dict[str, Any]) -> RawJpeg:
    """A raw sample (tar member suffix -> bytes) -> :class:`RawJpeg`, reading only the image's header.

    Raises :class:`SampleError` where :func:`check_sample` does, and ValueError for a sample without a
    JPEG: device decode needs JPEG shards.
    """
    label, size = check_sample(raw)
    if "jpg" not in raw:  # then a png: check_sample found an image
        raise not_jpeg(raw.get("__key__", "?"), raw.get("__url__", "?"), "png")
    return RawJpeg(raw["__key__"], raw["jpg"], label, size)


def check_jpeg_shards(shards: ShardSpec) -> None:
    """Raises ValueError (naming ``data.decode``) unless the first sample of the first shard is a JPEG."""
    url = resolve_shards(shards).urls[0]
    key, suffix = "?", "no image"
    with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, _, suffix = posixpath.basename(member.name).partition(".")
            if suffix in ("jpg", "png"):
                break
    if suffix != "jpg":
        raise not_jpeg(key, url, suffix)


def not_jpeg(key: str, url: str, holds: str) -> ValueError:
    """The error for a sample that device decode cannot read: it holds ``holds``, not a JPEG."""
    return ValueError(
        f"data.decode='device' needs JPEG shards, but sample {key!r} of {url} holds {holds} "
        "(the synthetic set is stored as PNG): use data.decode='cpu', or shards written by "
        "python -m readout.tools.imagenet"
    )


class DeviceTrainTransform:
    """The train transform (:func:`train_transform`: RandomResizedCrop, then a horizontal flip) with the
    decode moved onto the batch's device.

    In the loader worker, :meth:`element` draws the crop and the flip from the torch generator exactly
    as the CPU transform of the same settings draws them, knowing only the image's size; the batch
    then carries the JPEG bytes. On the device, :meth:`apply` decodes the whole batch in one call
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA) and crops, resizes and flips each image there with
    the CPU transform's own kernels and settings. Only ``image``, ``label`` and ``key`` come out: what
    a training step reads (no boxes or masks).
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
    ) -> None:
        steps = train_transform(size, scale, ratio, flip).transforms
        self.crop = next(step for step in steps if isinstance(step, v2.RandomResizedCrop))
        self.flip = next(step for step in steps if isinstance(step, v2.RandomHorizontalFlip))

    def element(self, sample: RawJpeg) -> dict[str, Any]:
        """One element of a raw batch: jpeg (bytes), label, key, crop (4,) [top, left, h, w], flip ()."""
        height, width = sample.size
        shape_only = tv_tensors.Image(torch.empty(0, height, width, dtype=torch.uint8))
        params = self.crop.make_params([shape_only])
        flipped = bool(torch.rand(1) < self.flip.p)  # v2's random-apply rule, drawn after the crop
        return {
            "jpeg": sample.data,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "key": sample.key,
            "crop": torch.tensor([params[k] for k in ("top", "left", "height", "width")]),
            "flip": torch.tensor(flipped),
        }

    def apply(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A raw batch (``jpeg``: B bytes; ``crop``, ``flip``: tensors or lists) -> image (B, 3, S, S)
        float32 in [0, 1] on ``device``, label, key."""
        crops = batch["crop"].tolist() if isinstance(batch["crop"], torch.Tensor) else batch["crop"]
        flips = batch["flip"].tolist() if isinstance(batch["flip"], torch.Tensor) else batch["flip"]
        images = []
        for image, (top, left, height, width), flipped in zip(
            decode_jpegs(batch["jpeg"], device), crops, flips, strict=True
        ):
            image = F.resized_crop(
                image, top, left, height, width, self.crop.size, self.crop.interpolation,
                antialias=self.crop.antialias,
            )  # fmt: skip
            images.append(F.horizontal_flip(image) if flipped else image)
        image = F.to_dtype(torch.stack(images), torch.float32, scale=True)
        return {"image": image, "label": batch["label"].to(device), "key": batch["key"]}
