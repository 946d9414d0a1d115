"""The shard format: what one sample and one manifest look like, shared by every writer and the reader.

A shard is a plain tar file (webdataset layout). One sample is the group of tar members that share a key:

- ``<key>.jpg`` or ``<key>.png``: the RGB image.
- ``<key>.cls``: the class index as an ASCII integer (torchvision's index; ImageNet: sorted wnids).
- ``<key>.json``: ``{"bbox": [[x0, y0, x1, y1], ...], "size": [W, H], "label": name}``; boxes in pixels
  of the stored image, ``x1``/``y1`` exclusive, so a box covers the pixels whose centres ``(c + 0.5)``
  lie in ``[x0, x1)``; an empty list when the sample has no box.
- ``<key>.mask.png``: the object's pixel mask (0 or 255, same size as the image), only where one exists.

Keys hold no dot and no slash: webdataset splits a member name at the first dot of its base name.

Next to the shards lies ``manifest.json`` (:class:`Manifest`): the shards with their sample counts, the
class names, samples per class, the files that were skipped and why, and how the set was made.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from readout.atomic import atomic_write

FORMAT = "readout-shards/1"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "png")

Box = tuple[float, float, float, float]


class SampleError(ValueError):
    """A sample that cannot be decoded; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


#: Why a sample or a shard can be skipped by the reader.
SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "missing_cls",
    "bad_cls",
    "bad_json",
    "bad_mask",
    "bad_shard",
)


@dataclass
class ShardSample:
    """One decoded sample.

    image: (H, W, 3) uint8 RGB. boxes: [x0, y0, x1, y1] in pixels (see the module docstring).
    mask: (H, W) bool, or None where the sample has no mask.
    """

    key: str
    image: np.ndarray
    label: int
    label_name: str
    boxes: list[Box]
    mask: np.ndarray | None = None


def check_key(key: str) -> str:
    """The key itself; raises if webdataset would split it wrongly (a dot or a slash in it)."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and hold no '.' or '/'")
    return key


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 or (H, W) bool -> PNG bytes (lossless)."""
    image = Image.fromarray(array.astype(np.uint8) * 255 if array.dtype == bool else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_sample(
    key: str,
    image: bytes,
    image_ext: Literal["jpg", "png"],
    label: int,
    label_name: str,
    boxes: list[Box],
    size: tuple[int, int],
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """The tar members of one sample, ready for ``wds.TarWriter(encoder=False)``.

    image: already encoded bytes (``image_ext`` says which codec). size: (W, H) of that image.
    mask: (H, W) bool or None.
    """
    if image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTENSIONS}, got {image_ext!r}")
    meta = {
        "bbox": [[float(v) for v in box] for box in boxes],
        "size": [int(size[0]), int(size[1])],
        "label": label_name,
    }
    sample: dict[str, Any] = {
        "__key__": check_key(key),
        image_ext: image,
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }
    if mask is not None:
        if mask.shape != (size[1], size[0]):
            raise ValueError(f"mask of {key!r} has shape {mask.shape}, image size (W, H) is {size}")
        sample["mask.png"] = encode_png(mask.astype(bool))
    return sample


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB; any mode (L, CMYK, P, RGBA) is converted."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.array(image.convert("RGB"))


def decode_jpegs(data: Sequence[bytes], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Encoded JPEG bytes -> (3, H, W) uint8 RGB tensors on ``device``, decoded as one batch.

    torchvision's ``decode_jpeg`` on a list: on a CUDA device the batch goes through nvJPEG in one
    call, on the CPU through libjpeg one image after another. Greyscale JPEGs come back as RGB.
    torchvision deprecates its decoders from 0.29 on (in favour of TorchCodec, not a dependency here),
    so each call warns; the reader itself decodes with PIL (:func:`decode_image`).
    """
    encoded = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def decode_sample(raw: dict[str, Any]) -> ShardSample:
    """A sample as read from a tar (member suffix -> bytes) -> :class:`ShardSample`.

    Raises :class:`SampleError` with a reason from :data:`SKIP_REASONS` when anything is missing or broken.
    """
    where = _where(raw)
    label = _label(raw, where)
    ext = _image_ext(raw, where)
    try:
        image = decode_image(raw[ext])
    except Exception as error:  # PIL raises many kinds on broken data
        raise SampleError("unreadable_image", f"{where}: cannot decode {ext} ({error})") from error
    meta, boxes = _meta(raw, where)
    mask = None
    if "mask.png" in raw:
        try:
            mask = decode_mask(raw["mask.png"])
        except Exception as error:
            raise SampleError("bad_mask", f"{where}: cannot decode mask.png ({error})") from error
        _check_mask_size(mask.shape, image.shape[:2], where)
    return ShardSample(raw.get("__key__", "?"), image, label, str(meta.get("label", label)), boxes, mask)


def check_sample(raw: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    """Raises the :class:`SampleError` that :func:`decode_sample` would raise, without decoding pixels;
    returns the label and the image's (H, W), read from its header.

    For passing over samples cheaply (a resumed run skipping what it trained on). It reads the headers
    of the image and the mask, verifies a PNG's chunk checksums and that a JPEG's last scan ends in
    an end-of-image marker, so a file cut short is caught. What it misses: compressed data broken
    under whole headers, checksums and markers. :mod:`readout.tools.imagenet` decodes every file it
    writes, so its shards hold no such file.
    """
    where = _where(raw)
    label = _label(raw, where)
    ext = _image_ext(raw, where)
    try:
        width, height = image_header(raw[ext])
    except Exception as error:
        raise SampleError("unreadable_image", f"{where}: cannot decode {ext} ({error})") from error
    _meta(raw, where)
    if "mask.png" in raw:
        try:
            mask_width, mask_height = image_header(raw["mask.png"])
        except Exception as error:
            raise SampleError("bad_mask", f"{where}: cannot decode mask.png ({error})") from error
        _check_mask_size((mask_height, mask_width), (height, width), where)
    return label, (height, width)


def image_header(data: bytes) -> tuple[int, int]:
    """(W, H) of encoded image bytes from the header; raises where the file is cut short (see
    :func:`check_sample`) or is no image."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if image.format == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            # 0xFF is stuffed inside entropy-coded data, so these bytes are markers: EOI after the last SOS
            raise OSError("image file is truncated (no end-of-image marker after the last scan)")
        image.verify()  # PNG: reads every chunk and checks its CRC
    return size


def _where(raw: dict[str, Any]) -> str:
    return f"sample {raw.get('__key__', '?')!r} of {raw.get('__url__', '?')}"


def _label(raw: dict[str, Any], where: str) -> int:
    if "cls" not in raw:
        raise SampleError("missing_cls", f"{where} has no 'cls'")
    try:
        return int(raw["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as error:
        raise SampleError("bad_cls", f"{where}: 'cls' is not an integer ({error})") from error


def _image_ext(raw: dict[str, Any], where: str) -> str:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise SampleError("missing_image", f"{where} has no jpg or png")
    return ext


def _meta(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], list[Box]]:
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        boxes = [(float(a), float(b), float(c), float(d)) for a, b, c, d in meta.get("bbox", [])]
    except (ValueError, TypeError) as error:
        raise SampleError("bad_json", f"{where}: bad json ({error})") from error
    return meta, boxes


def _check_mask_size(mask: tuple[int, ...], image: tuple[int, ...], where: str) -> None:
    if tuple(mask) != tuple(image):
        raise SampleError("bad_mask", f"{where}: mask {tuple(mask)} differs from image {tuple(image)}")


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) bool."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("L")) > 127


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of boxes rasterised by pixel centres.

    boxes: (N, 4) [x0, y0, x1, y1] in pixels -> (height, width) bool; pixel (r, c) is in a box when
    ``x0 <= c + 0.5 < x1`` and ``y0 <= r + 0.5 < y1``. N = 0 gives an all-False mask.
    """
    boxes = boxes.reshape(-1, 4).to(torch.float32)
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    inside_x = (xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])  # (N, W)
    inside_y = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])  # (N, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0)


@dataclass
class ShardInfo:
    """One shard of a manifest: its file name (relative to the manifest) and how many samples it holds."""

    name: str
    samples: int


@dataclass
class Manifest:
    """``manifest.json``: what a directory of shards holds and how it was made."""

    classes: list[str]
    shards: list[ShardInfo]
    per_class: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["samples"] = self.samples
        return json.dumps(data, indent=2) + "\n"

    def write(self, path: str) -> None:
        """Writes the manifest to a local path or any fsspec URL, atomically (:mod:`readout.atomic`)."""
        atomic_write(str(path), self.to_json().encode())

    @classmethod
    def read(cls, path: str) -> Manifest:
        """Reads a manifest from a local path or any fsspec URL."""
        with fsspec.open(path, "r") as stream:
            data = json.load(stream)
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found != FORMAT or not isinstance(data.get("shards"), list):
            raise ValueError(
                f"{path} is not a shard manifest (format {found!r}, expected {FORMAT!r}, with a list "
                "of shards)"
            )
        shards = [ShardInfo(**shard) for shard in data["shards"]]
        return cls(
            data["classes"],
            shards,
            data.get("per_class", {}),
            data.get("skipped", []),
            data.get("source", {}),
        )
