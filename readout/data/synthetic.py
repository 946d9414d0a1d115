"""A synthetic data set with ground truth: the class of an image is the shape of its one object.

Each image holds one object (a circle, square, triangle, star, cross or ring) of random colour, size,
rotation and position on a cluttered background: low-frequency colour noise, stripes of random
orientation and frequency, grain, and 1-3 irregular blobs of random colour whose number and look do
not depend on the class. So a classifier has to find the object, and an attribution can be scored
against the object's box and its pixel mask, which every sample carries.

The object's tight box covers 3-30% of the image (by construction and checked). Its colour is drawn
until it differs from the background under it by at least :data:`MIN_CONTRAST` (RGB distance in
[0, 1] units), so it is visible but not trivially so. The blobs are drawn first, the object on top, so
the mask is exactly the object's visible pixels.

Sample ``i`` of seed ``s`` depends on ``(s, i)`` alone, so any index range can be regenerated, in any
order or process. Sizes from 32 to 224 px; all geometry scales with the size.

Written by ``python -m readout.tools.synthetic --out DIR --n N --size S --seed SEED [--shard-size M]`` writes
shards in the format of :mod:`readout.data.format` and their ``manifest.json``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from readout.data.format import MANIFEST_NAME, Manifest, ShardInfo, box_mask, encode_png, encode_sample

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
MIN_SIZE, MAX_SIZE = 32, 224
#: The object's tight box covers this share of the image.
BOX_FRACTION = (0.03, 0.30)
#: Box share the drawing aims for: inside BOX_FRACTION with room for rasterisation at 32 px.
_TARGET_FRACTION = (0.06, 0.22)
#: Least RGB distance (in [0, 1] per channel) between the object's colour and the background under it.
MIN_CONTRAST = 0.4
_RING_HOLE = 0.55


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample.

    image: (H, W, 3) uint8 RGB. label: index into :data:`CLASSES`. bbox: [x0, y0, x1, y1] in pixels,
    tight around the mask with x1, y1 exclusive. mask: (H, W) bool, the object's visible pixels.
    """

    key: str
    image: np.ndarray
    label: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray


def sample_key(seed: int, index: int) -> str:
    """The shard key of sample ``index`` of ``seed`` (no dots: webdataset splits member names there)."""
    return f"s{seed}-{index:08d}"


def make_sample(seed: int, index: int, size: int) -> SyntheticSample:
    """Sample ``index`` of ``seed`` at ``size`` x ``size`` pixels; a pure function of its arguments."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {size}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    canvas = _background(rng, size)
    for _ in range(int(rng.integers(1, 4))):
        blob = _polygon_mask(size, [_blob_polygon(rng, size)])
        canvas[blob] = rng.uniform(0.0, 1.0, 3)
    mask, bbox = _object(rng, label, size)
    canvas[mask] = _contrasting_colour(rng, canvas[mask].mean(axis=0))
    canvas += rng.normal(0.0, rng.uniform(0.01, 0.05), canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return SyntheticSample(sample_key(seed, index), image, label, bbox, mask)


def generate(n: int, size: int, seed: int, start: int = 0) -> Iterator[SyntheticSample]:
    """Samples ``start, ..., start + n - 1`` of ``seed``."""
    for index in range(start, start + n):
        yield make_sample(seed, index, size)


def synthetic_batch(n: int, size: int, seed: int, start: int = 0) -> dict[str, Any]:
    """``n`` samples as one batch in the reader's format (see :mod:`readout.data.shards`), no shards.

    image: (n, 3, size, size) float32 in [0, 1]; label: (n,) int64; box_mask, mask: (n, size, size) bool;
    has_mask: (n,) bool, all True; key: list of n str.
    """
    samples = list(generate(n, size, seed, start))
    images = np.stack([s.image for s in samples])
    return {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0),
        "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "box_mask": torch.stack([box_mask(torch.tensor([s.bbox]), size, size) for s in samples]),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
        "has_mask": torch.ones(n, dtype=torch.bool),
        "key": [s.key for s in samples],
    }


# ---------------------------------------------------------------------------------------------------------
# Drawing


@functools.lru_cache(maxsize=32)
def _upsampler(size: int, grid: int) -> np.ndarray:
    """(size, grid) smooth interpolation weights from ``grid`` control points to ``size`` pixels."""
    t = (np.arange(size) + 0.5) / size * (grid - 1)
    low = np.minimum(np.floor(t).astype(int), grid - 2)
    frac = t - low
    frac = frac * frac * (3.0 - 2.0 * frac)  # smoothstep: no visible ridges at the control points
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), low] = 1.0 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: a base colour, two octaves of colour noise and tinted stripes."""
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = rng.uniform(0.25, 0.75, 3)
    for grid, amplitude in ((3, 0.2), (6, 0.1)):
        weights = _upsampler(size, grid)
        control = rng.uniform(-amplitude, amplitude, (3, grid, grid)).astype(np.float32)
        canvas += (weights @ control @ weights.T).transpose(1, 2, 0)
    angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(2.0, 8.0), rng.uniform(0, 2 * np.pi)
    coords = np.arange(size, dtype=np.float32) / size
    wave = np.sin(
        2 * np.pi * cycles * (coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)) + phase
    )
    tint = rng.uniform(0.5, 1.0, 3).astype(np.float32) * rng.uniform(0.02, 0.10)
    canvas += wave[:, :, None].astype(np.float32) * tint
    return canvas


def _unit_shape(label: int) -> list[np.ndarray]:
    """Polygons (each (V, 2), x and y) of a class's shape inside the unit disc; later ones are holes."""
    name = CLASSES[label]
    if name in ("circle", "ring"):
        theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        disc = np.stack([np.cos(theta), np.sin(theta)], axis=1)
        return [disc, _RING_HOLE * disc] if name == "ring" else [disc]
    if name == "square":
        theta = np.pi / 4 + np.arange(4) * np.pi / 2
    elif name == "triangle":
        theta = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    elif name == "star":
        theta = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)]
    elif name == "cross":
        a, b = 1.0, 0.32
        arm = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        arm += [(-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        return [np.array(arm, dtype=np.float64)]
    return [np.stack([np.cos(theta), np.sin(theta)], axis=1)]


def _object(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The object's mask (size, size) bool and its tight box; redrawn until the box share is in range."""
    area = size * size
    while True:
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        polygons = [p @ rotation.T for p in _unit_shape(label)]
        low, high = polygons[0].min(axis=0), polygons[0].max(axis=0)
        extent = high - low
        scale = np.sqrt(rng.uniform(*_TARGET_FRACTION) * area / (extent[0] * extent[1]))
        # keep the box a pixel inside the image so that the mask is never cut at the border
        centre = rng.uniform(1.0 - low * scale, size - 1.0 - high * scale)
        mask = _polygon_mask(size, [p * scale + centre for p in polygons])
        bbox = _tight_box(mask)
        if BOX_FRACTION[0] <= (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) / area <= BOX_FRACTION[1]:
            return mask, bbox


def _blob_polygon(rng: np.random.Generator, size: int) -> np.ndarray:
    """A distractor: an irregular, elongated blob (radius with 2nd and 3rd harmonics), anywhere."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radius = 1.0 + rng.uniform(0.2, 0.4) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    radius += rng.uniform(0.0, 0.2) * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    scale = np.sqrt(rng.uniform(0.02, 0.12) * size * size / np.pi)
    centre = rng.uniform(0, size, 2)
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1) * scale + centre


def _polygon_mask(size: int, polygons: list[np.ndarray]) -> np.ndarray:
    """(size, size) bool: the first polygon filled, the others cut out. Vertices in pixel coordinates
    (pixel (r, c) has its centre at (c + 0.5, r + 0.5)); PIL puts centres on integers, hence the shift."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, polygon in enumerate(polygons):
        draw.polygon([(float(x), float(y)) for x, y in polygon - 0.5], fill=0 if i else 255)
    return np.asarray(canvas) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray, tries: int = 32) -> np.ndarray:
    """A random RGB colour at least MIN_CONTRAST from ``background`` (3,); the farthest of ``tries``."""
    best, best_distance = background, -1.0
    for _ in range(tries):
        colour = rng.uniform(0.0, 1.0, 3)
        distance = float(np.linalg.norm(colour - background))
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


# ---------------------------------------------------------------------------------------------------------
# Shards


def write_shards(
    out: str | Path, n: int, size: int, seed: int, shard_size: int = 1000, start: int = 0
) -> Manifest:
    """Writes samples ``start .. start + n - 1`` of ``seed`` to ``out/synthetic-%06d.tar`` + manifest.json.

    Images are stored as PNG: lossless, so the shards give exactly the pixels of :func:`generate` and
    the object's hard edges match its mask. The grain barely compresses, which a synthetic set can
    afford.
    """
    _check_shard_arguments(n, size, seed, shard_size, start)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    per_class: Counter[str] = Counter()
    pattern = str(out / "synthetic-%06d.tar")
    with wds.ShardWriter(
        pattern,
        maxcount=shard_size,
        post=lambda name: names.append(Path(name).name),
        verbose=0,
        encoder=False,
        mtime=0,
    ) as writer:
        for sample in generate(n, size, seed, start):
            writer.write(to_record(sample))
            per_class[CLASSES[sample.label]] += 1
    counts = [min(shard_size, n - i * shard_size) for i in range(len(names))]
    manifest = Manifest(
        classes=list(CLASSES),
        shards=[ShardInfo(name, count) for name, count in zip(names, counts, strict=True)],
        per_class={name: per_class[name] for name in CLASSES},
        source={"generator": "readout.data.synthetic", "n": n, "size": size, "seed": seed, "start": start},
    )
    manifest.write(str(out / MANIFEST_NAME))
    return manifest


def _check_shard_arguments(n: int, size: int, seed: int, shard_size: int, start: int) -> None:
    """Bad arguments of :func:`write_shards` fail before anything is written, naming the argument."""
    limits = {"n": (n, 1), "seed": (seed, 0), "shard_size": (shard_size, 1), "start": (start, 0)}
    for name, (value, least) in limits.items():
        if value < least:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= {least}, got {value}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size (--size) must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {size}")


def to_record(sample: SyntheticSample) -> dict[str, Any]:
    """A synthetic sample as tar members (see :mod:`readout.data.format`)."""
    height, width = sample.mask.shape
    x0, y0, x1, y1 = (float(v) for v in sample.bbox)
    image = encode_png(sample.image)
    label = CLASSES[sample.label]
    return encode_sample(
        sample.key, image, "png", sample.label, label, [(x0, y0, x1, y1)], (width, height), sample.mask
    )
