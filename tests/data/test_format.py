"""The sample format: encode then decode gives the sample back; box rasterisation by pixel centres;
the batched JPEG decode gives the pixels the reader's PIL decode gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from readout.data.format import (
    Manifest,
    SampleError,
    box_mask,
    decode_image,
    decode_jpegs,
    decode_sample,
    encode_png,
    encode_sample,
)


def test_encode_then_decode_gives_the_sample_back() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    mask = rng.random((12, 20)) > 0.5
    raw = encode_sample("k-1", encode_png(image), "png", 4, "star", [(1, 2, 3.5, 4)], (20, 12), mask)
    assert raw["cls"] == b"4"
    sample = decode_sample(raw)
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.mask, mask)
    assert (sample.key, sample.label, sample.label_name, sample.boxes) == ("k-1", 4, "star", [(1, 2, 3.5, 4)])


def test_keys_with_dots_are_refused_and_bad_cls_is_a_sample_error() -> None:
    with pytest.raises(ValueError, match="key"):
        encode_sample("a.b", b"", "png", 0, "x", [], (1, 1))
    raw = encode_sample("k", encode_png(np.zeros((2, 2, 3), np.uint8)), "png", 0, "x", [], (2, 2))
    raw["cls"] = b"seven"
    with pytest.raises(SampleError) as error:
        decode_sample(raw)
    assert error.value.reason == "bad_cls"


def test_box_mask_matches_a_pixel_by_pixel_reference() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [4.4, 1.6, 7.5, 5.0], [9.0, 9.0, 9.0, 12.0]])
    height, width = 8, 10
    expected = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        for r in range(height):
            for c in range(width):
                if x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1:
                    expected[r, c] = True
    assert torch.equal(box_mask(boxes, height, width), expected)
    assert not box_mask(torch.zeros(0, 4), 3, 3).any()


def jpegs() -> list[bytes]:
    """An RGB and a greyscale JPEG of random content, of different sizes, and a smooth RGB one.

    The noise image is stored without chroma subsampling (4:4:4) and the smooth one with it (4:2:0,
    PIL's default): decoders may upsample chroma differently (libjpeg's "fancy" upsampling against
    nvJPEG's), which on pixel noise changes colours by many levels and on smooth content by few.
    """
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:32, 0:48]
    smooth = np.stack([rows * 8, cols * 5, (rows + cols) * 3], axis=-1).astype(np.uint8)
    images = [
        (rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), {"subsampling": 0}),
        (rng.integers(0, 256, (17, 9), dtype=np.uint8), {}),
        (smooth, {}),
    ]
    encoded = []
    for array, options in images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90, **options)
        encoded.append(buffer.getvalue())
    return encoded


def test_batched_jpeg_decode_on_the_cpu_gives_the_pil_pixels() -> None:
    data = jpegs()
    decoded = decode_jpegs(data, "cpu")
    assert [tuple(image.shape) for image in decoded] == [(3, 24, 40), (3, 17, 9), (3, 32, 48)]
    for image, item in zip(decoded, data, strict=True):
        reference = torch.from_numpy(decode_image(item)).permute(2, 0, 1)
        assert image.dtype == torch.uint8
        # both are libjpeg builds; allow a rounding step where their versions differ
        assert (image.int() - reference.int()).abs().max() <= 1


@pytest.mark.gpu
def test_batched_jpeg_decode_on_a_gpu_gives_the_cpu_pixels_nearly() -> None:
    data = jpegs()
    on_gpu, on_cpu = decode_jpegs(data, "cuda"), decode_jpegs(data, "cpu")
    assert all(image.device.type == "cuda" for image in on_gpu)
    assert [image.shape for image in on_gpu] == [image.shape for image in on_cpu]
    # nvJPEG's IDCT and colour conversion differ from libjpeg's by a few levels at most
    errors = [(g.cpu().float() - c.float()).abs().mean().item() for g, c in zip(on_gpu, on_cpu, strict=True)]
    assert max(errors) < 3, errors


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ({"format": "webdataset/9", "shards": []}, "'webdataset/9'"),
        ({"shards": []}, "None"),
        ([1, 2], "'list'"),
        ({"format": "readout-shards/1"}, "'readout-shards/1'"),
    ],
    ids=["other-format", "no-format", "not-an-object", "no-shards"],
)
def test_a_json_that_is_not_a_shard_manifest_is_refused_by_name(
    tmp_path: Path, content: dict, found: str
) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        Manifest.read(str(path))
    expected = (
        f"{path} is not a shard manifest (format {found}, expected 'readout-shards/1', with a list of shards)"
    )
    assert str(error.value) == expected
