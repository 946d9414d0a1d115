import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from readout import explain
from readout.backbones import load_classifier
from readout.bundle import load
from readout.data.synthetic import synthetic_batch, write_shards
from readout.explain import main
from readout.images import BadImage, load_image
from readout.per_sample import PerSample
from readout.plotting import save_heatmap_png
from readout.relevance import RelevanceIBA
from readout.resources import checkpoint_dir


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


def test_odd_files_are_reported_and_the_rest_are_done(classifier_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("readout.precision._reported", set())  # the choice is logged once per process
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
    # The precision "auto" chose is in the summary and on stderr (conftest: no native bf16 in tests).
    assert summary["precision"] == "fp32"
    assert "precision auto on cpu: fp32 (no native bf16)" in capsys.readouterr().err


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


BUNDLE = checkpoint_dir() / "readout-demo"


def object_images(folder, count=2):
    """``count`` synthetic 64 px images (one object each, so the readout finds information) as PNGs."""
    images = synthetic_batch(count, 64, seed=9)["image"]
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img{i}.png"
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bundle():
    """The shipped readout, loaded once: the expected maps are computed with it."""
    return load(BUNDLE)


def loaded_batch(paths):
    return torch.stack([load_image(path, 64) for path in paths])


class ColourScaleSpy:
    """Stands in for ``save_heatmap_png`` in readout.explain: draws as usual, keeps the scale per file."""

    def __init__(self):
        self.scales = {}

    def __call__(self, path, *args, **kwargs):
        self.scales[Path(path).stem] = save_heatmap_png(path, *args, **kwargs)
        return self.scales[Path(path).stem]


@pytest.fixture
def colour_spy(monkeypatch):
    spy = ColourScaleSpy()
    monkeypatch.setattr(explain, "save_heatmap_png", spy)
    return spy


def test_readout_method_writes_the_bundles_maps(tmp_path, colour_spy, bundle):
    paths = object_images(tmp_path)
    out = tmp_path / "out"
    assert main(["--method", "readout", "--checkpoint", str(BUNDLE), "--images", *map(str, paths),
                 "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "readout" and set(summary["images"]) == {"img0", "img1"}
    expected = bundle(loaded_batch(paths))
    for i, stem in enumerate(["img0", "img1"]):
        heatmap = np.load(out / f"{stem}.npy")
        assert heatmap.dtype == np.float32 and heatmap.shape == (64, 64)
        torch.testing.assert_close(torch.from_numpy(heatmap), expected[i], rtol=1e-5, atol=1e-6)
        assert summary["images"][stem]["total_bits"] == pytest.approx(float(heatmap.sum()), rel=1e-4)
        assert (out / f"{stem}.png").stat().st_size > 0
        scale = colour_spy.scales[stem]
        assert scale.cmap == "inferno" and scale.vmin == 0 and scale.vmax == pytest.approx(heatmap.max())


def test_readout_method_without_a_checkpoint_is_a_clear_error(tmp_path):
    (path,) = object_images(tmp_path, count=1)
    with pytest.raises(SystemExit, match="--method readout needs --checkpoint"):
        main(["--method", "readout", "--images", str(path), "--out", str(tmp_path / "out")])


def test_relevance_readout_writes_signed_maps_on_a_symmetric_colour_scale(tmp_path, colour_spy, bundle):
    paths = object_images(tmp_path)
    out = tmp_path / "out"
    assert main(["--method", "relevance-readout", "--checkpoint", str(BUNDLE), "--images",
                 *map(str, paths), "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relevance"] == {
        "composite": "EpsilonPlusFlat", "canonizer": "resnet", "injection": "information", "mask_dead": False
    }  # fmt: skip
    # The same batch as the CLI's: float32 relevance is not exactly batch independent (readout.relevance).
    expected = RelevanceIBA(bundle).explain(loaded_batch(paths))
    for i, stem in enumerate(["img0", "img1"]):
        heatmap = np.load(out / f"{stem}.npy")
        torch.testing.assert_close(torch.from_numpy(heatmap), expected.heatmap[i], rtol=1e-4, atol=1e-6)
        record = summary["images"][stem]
        assert record["conservation"] == pytest.approx(float(expected.conservation[i]), rel=1e-5)
        scale = colour_spy.scales[stem]
        assert scale.cmap == "bwr" and scale.vmin == -scale.vmax
        assert scale.vmax == pytest.approx(float(np.abs(heatmap).max()))


@pytest.mark.parametrize(
    "flags, options",
    [
        (["--injection", "lambda-activation"], {"injection": "lambda-activation"}),
        (["--mask-dead"], {"mask_dead": True}),
        (["--canonizer", "none"], {"canonizer": "none"}),
        (["--composite", "EpsilonAlpha2Beta1Flat"], {"composite": "EpsilonAlpha2Beta1Flat"}),
    ],
)
def test_relevance_options_reach_the_attributor(tmp_path, flags, options, bundle):
    (path,) = object_images(tmp_path, count=1)
    out = tmp_path / "out"
    assert main(["--method", "relevance-readout", "--checkpoint", str(BUNDLE), "--images", str(path),
                 "--out", str(out), *flags]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    defaults = {"composite": "EpsilonPlusFlat", "canonizer": "resnet", "injection": "information"}
    assert summary["relevance"] == {**defaults, "mask_dead": False, **options}
    image = loaded_batch([path])
    heatmap = torch.from_numpy(np.load(out / "img0.npy"))
    torch.testing.assert_close(heatmap, RelevanceIBA(bundle, **options)(image)[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(heatmap, RelevanceIBA(bundle)(image)[0], rtol=1e-2, atol=1e-4)


def test_bad_relevance_options_are_refused_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--method", "relevance-readout", "--images", "a.png", "--out", str(tmp_path),
              "--injection", "lambda"])  # fmt: skip
    assert "lambda-activation" in capsys.readouterr().err


def test_statistics_are_estimated_from_the_given_shards(classifier_path, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, n=12, size=64, seed=3, shard_size=4)
    (path,) = object_images(tmp_path, count=1)
    cache = tmp_path / "cache"
    assert main(["--classifier", str(classifier_path), "--estimate-shards", str(shards), "--images",
                 str(path), "--out", str(tmp_path / "out"), "--steps", "1", "--copies", "1",
                 "--cache", str(cache)]) == 0  # fmt: skip
    (cached,) = cache.glob("*.safetensors")
    state = load_file(str(cached))
    assert state["count"].item() == 12, "every image of the shards, once"
    classifier = load_classifier(str(classifier_path))
    features = PerSample(classifier).features(synthetic_batch(12, 64, seed=3)["image"]).double()
    torch.testing.assert_close(state["total"] / state["count"], features.mean(0), rtol=1e-5, atol=1e-6)
    synthetic = tmp_path / "synthetic-cache"
    assert main(["--classifier", str(classifier_path), "--images", str(path), "--out", str(tmp_path / "o2"),
                 "--steps", "1", "--copies", "1", "--estimate-samples", "16",
                 "--cache", str(synthetic)]) == 0  # fmt: skip
    (other,) = synthetic.glob("*.safetensors")
    assert other.name != cached.name, "the data source is part of the cache key"


@pytest.mark.gpu
def test_per_sample_cli_runs_on_cuda_with_the_default_seed(classifier_path, tmp_path):
    # The seed defaults to 0: the noise generator has to follow the attributor onto the GPU.
    paths = object_images(tmp_path)
    out = tmp_path / "out"
    assert main(["--classifier", str(classifier_path), "--images", *map(str, paths), "--out", str(out),
                 "--steps", "2", "--copies", "2", "--estimate-samples", "32", "--cache",
                 str(tmp_path / "cache"), "--device", "cuda"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    for stem, record in summary["images"].items():
        assert np.load(out / f"{stem}.npy").sum() == pytest.approx(record["total_bits"], rel=1e-4)
