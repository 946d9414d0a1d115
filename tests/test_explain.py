import json

import numpy as np
import pytest
import torch
from PIL import Image

from readout.backbones import load_classifier, save_classifier
from readout.explain import main
from readout.images import BadImage, load_image


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "random-cnn"
    save_classifier(load_classifier("synthetic-cnn", weights=None), path, {"note": "random, for tests"})
    return path.with_suffix(".safetensors")


def odd_files(folder):
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "plain.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    frames = [Image.fromarray(np.roll(rgb, i, axis=0)) for i in range(3)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")


def test_odd_files_are_reported_and_the_rest_are_done(classifier_path, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    odd_files(images)
    out = tmp_path / "out"
    code = main(
        [
            "--classifier", str(classifier_path), "--images", str(images / "*"), "--out", str(out),
            "--steps", "2", "--copies", "2", "--estimate-samples", "64", "--cache", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1
    assert set(summary["failed"]) == {str(images / "empty.jpg"), str(images / "notes.jpg")}
    assert set(summary["images"]) == {"plain", "gray", "alpha", "cmyk", "deep", "dot", "moving"}
    for stem, record in summary["images"].items():
        heatmap = np.load(out / f"{stem}.npy")
        assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
        assert heatmap.sum() == pytest.approx(record["total_bits"], rel=1e-4)
        assert (out / f"{stem}.png").stat().st_size > 0
        assert 0 <= record["probability_bottleneck"] <= 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_statistics_are_cached_and_reused(classifier_path, tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "a.png")
    args = ["--classifier", str(classifier_path), "--images", str(tmp_path / "a.png"), "--steps", "1",
            "--copies", "1", "--estimate-samples", "32", "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cached = next((tmp_path / "cache").glob("*.safetensors"))
    stamp = cached.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "two")]) == 0
    assert cached.stat().st_mtime_ns == stamp


def test_a_pattern_that_matches_nothing_is_an_error(classifier_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image matches"):
        main(
            [
                "--classifier",
                str(classifier_path),
                "--images",
                str(tmp_path / "*.png"),
                "--out",
                str(tmp_path),
            ]
        )


def test_load_image_names_the_bad_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(BadImage, match="bad.jpg"):
        load_image(bad, 64)


def test_load_image_crops_the_centre_square(tmp_path):
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 20:40] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 20)
    assert image.shape == (3, 20, 20) and image.min() == 1.0


def test_relevance_method_writes_signed_maps_with_conservation(classifier_path, tmp_path):
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "a.png"
    )
    out = tmp_path / "out"
    args = ["--method", "relevance-per-sample", "--classifier", str(classifier_path), "--images",
            str(tmp_path / "a.png"), "--steps", "1", "--copies", "1", "--estimate-samples", "32",
            "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "summary.json").read_text())["images"]["a"]
    assert record["conservation"] == pytest.approx(1.0, abs=1e-3)
    heatmap = np.load(out / "a.npy")
    assert heatmap.sum() == pytest.approx(record["total_bits"] * record["conservation"], rel=1e-3)
