"""Reading image files of any kind PIL opens into the classifier's input: (3, S, S) float in [0, 1].

Grayscale, palette, RGBA (composited on white), CMYK, 16-bit PNG and animated images (first
frame) are converted to 8-bit RGB; the shorter side is resized to S and the centre cropped, so the
heatmap covers the centre square of the file. Anything else raises :class:`BadImage` naming the file.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF


class BadImage(ValueError):
    """A file that cannot be turned into an image; the message names the file and why."""


def expand_images(patterns: list[str]) -> list[Path]:
    """Files and globs -> the sorted files they name; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).exists() for m in matches):
            raise FileNotFoundError(f"no image matches {pattern!r}")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8))
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The file as (3, size, size) float in [0, 1]: shorter side resized to ``size``, centre crop."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = to_rgb(opened)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as error:
        raise BadImage(f"{path}: not a readable image ({type(error).__name__}: {error})") from error
    if min(image.size) < 1:
        raise BadImage(f"{path}: image has no pixels ({image.size})")
    tensor = TF.to_image(image)
    tensor = TF.resize(tensor, size, antialias=True)
    tensor = TF.center_crop(tensor, [size, size])
    return TF.to_dtype(tensor, torch.float32, scale=True)
