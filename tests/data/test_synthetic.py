"""The synthetic generator: deterministic, boxes and masks that agree, the batch format, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from readout.data.synthetic import (
    BOX_FRACTION,
    CLASSES,
    generate,
    make_sample,
    synthetic_batch,
    write_shards,
)
from readout.tools.synthetic import main


def test_same_seed_and_index_give_the_same_sample_in_any_order() -> None:
    forward = list(generate(6, 40, seed=3))
    tail = list(generate(3, 40, seed=3, start=3))
    for a, b in zip(forward[3:], tail, strict=True):
        assert a.key == b.key and a.label == b.label and a.bbox == b.bbox
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(make_sample(3, 0, 40).image, make_sample(4, 0, 40).image)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_box_covers_3_to_30_percent_and_holds_the_mask_tightly(size: int) -> None:
    for sample in generate(40 if size < 224 else 8, size, seed=1):
        x0, y0, x1, y1 = sample.bbox
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert BOX_FRACTION[0] <= (x1 - x0) * (y1 - y0) / size**2 <= BOX_FRACTION[1]
        rows, cols = np.nonzero(sample.mask)
        assert rows.size > 0
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)


def test_every_class_appears_and_classes_are_named() -> None:
    assert len(CLASSES) >= 6 and len(set(CLASSES)) == len(CLASSES)
    labels = {sample.label for sample in generate(120, 32, seed=0)}
    assert labels == set(range(len(CLASSES)))


def test_object_differs_from_its_surroundings() -> None:
    for sample in generate(20, 64, seed=2):
        inside = sample.image[sample.mask].astype(float).mean(axis=0)
        ring = np.zeros_like(sample.mask)
        x0, y0, x1, y1 = sample.bbox
        ring[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = True
        outside = sample.image[ring & ~sample.mask].astype(float).mean(axis=0)
        assert np.linalg.norm(inside - outside) > 20  # 0-255 RGB distance


def test_synthetic_batch_has_the_reader_format() -> None:
    batch = synthetic_batch(4, 32, seed=5)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    for name in ("box_mask", "mask"):
        assert batch[name].shape == (4, 32, 32) and batch[name].dtype == torch.bool
    assert batch["has_mask"].all()
    assert (batch["mask"] <= batch["box_mask"]).all()
    assert batch["key"] == [s.key for s in generate(4, 32, seed=5)]


def test_size_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="size"):
        make_sample(0, 0, 16)


def test_cli_writes_shards_and_manifest(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--n", "10", "--size", "32", "--seed", "7", "--shard-size", "4"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert all((tmp_path / s["name"]).is_file() for s in manifest["shards"])
    assert manifest["samples"] == 10 and sum(manifest["per_class"].values()) == 10
    assert manifest["classes"] == list(CLASSES) and manifest["source"]["seed"] == 7


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": 0}, r"n \(--n\) must be >= 1, got 0"),
        ({"seed": -1}, r"seed \(--seed\) must be >= 0, got -1"),
        ({"shard_size": 0}, r"shard_size \(--shard-size\) must be >= 1, got 0"),
        ({"size": 16}, r"size \(--size\) must be in \[32, 224\] px, got 16"),
    ],
    ids=["n", "seed", "shard_size", "size"],
)
def test_bad_shard_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        write_shards(tmp_path / "out", **{"n": 4, "size": 32, "seed": 0, **arguments})
    assert not (tmp_path / "out").exists()
