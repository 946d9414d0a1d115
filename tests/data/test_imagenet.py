"""ImageNet to shards on a tiny ILSVRC-shaped folder with odd files in it; reruns skip finished shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from readout.data import imagenet
from readout.data.format import Manifest
from readout.data.shards import make_loader
from readout.data.transforms import eval_transform
from readout.tools import imagenet as imagenet_cli

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: tench = 0
IDENTITY = eval_transform(None, None)


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _voc(path: Path, wnid: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
        f"<object><name>{wnid}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
    )


@pytest.fixture
def ilsvrc(tmp_path: Path) -> Path:
    """ROOT/train/<wnid>/*.JPEG (3 classes, 3 good files each plus odd ones), a flat val, box XMLs."""
    root = tmp_path / "ilsvrc"
    for c, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(_encode(_rgb(10 * c + i)))
    odd = root / "train" / WNIDS[1]
    (odd / f"{WNIDS[1]}_gray.JPEG").write_bytes(_encode(_rgb(1).convert("L")))
    (odd / f"{WNIDS[1]}_cmyk.JPEG").write_bytes(_encode(_rgb(2).convert("CMYK")))
    (odd / f"{WNIDS[1]}_png.JPEG").write_bytes(_encode(_rgb(3), "PNG"))
    (odd / f"{WNIDS[1]}_garbage.JPEG").write_bytes(b"\xff\xd8 this is not an image" * 10)
    _voc(root / "boxes" / WNIDS[0] / f"{WNIDS[0]}_0.xml", WNIDS[0], (40, 30), (4, 5, 13, 14))
    (root / "boxes" / WNIDS[0] / f"{WNIDS[0]}_2.xml").write_text("<annotation><size>")
    val = root / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate([WNIDS[2], WNIDS[0]], start=1):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_encode(_rgb(100 + i)))
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 0 0 9 9")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def _read_all(out: Path) -> dict[str, dict]:
    samples = {}
    for batch in make_loader(out, "eval", 4, num_workers=0, transform=IDENTITY):
        for i, key in enumerate(batch["key"]):
            samples[key] = {name: batch[name][i] for name in ("image", "label", "box_mask")}
    return samples


def test_train_split_converts_odd_files_skips_garbage_and_writes_a_manifest(
    ilsvrc: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    manifest = imagenet.convert(
        ilsvrc, "train", out, options=imagenet.ConvertOptions(boxes=str(ilsvrc / "boxes")),
        max_shard_count=4, progress=False,
    )  # fmt: skip
    assert manifest.classes == WNIDS
    assert manifest.samples == 12 and len(manifest.shards) == 4  # 13 files in shards of at most 4
    assert manifest.per_class == {WNIDS[0]: 3, WNIDS[1]: 6, WNIDS[2]: 3}
    skipped = {s["file"]: s["reason"] for s in manifest.skipped}
    assert skipped.keys() == {
        f"train/{WNIDS[1]}/{WNIDS[1]}_garbage.JPEG",
        f"train/{WNIDS[0]}/{WNIDS[0]}_2.JPEG",
    }
    assert "unreadable image" in skipped[f"train/{WNIDS[1]}/{WNIDS[1]}_garbage.JPEG"]
    assert "image kept without boxes" in skipped[f"train/{WNIDS[0]}/{WNIDS[0]}_2.JPEG"]
    assert Manifest.read(str(out / "manifest.json")).samples == 12

    samples = _read_all(out)
    assert len(samples) == 12
    for key, sample in samples.items():
        assert sample["label"].item() == WNIDS.index(key.split("_")[0])
        assert sample["image"].shape == (3, 30, 40)
    for odd in ("gray", "cmyk", "png"):
        assert samples[f"{WNIDS[1]}_{odd}"]["image"].std() > 0
    expected = torch.zeros(30, 40, dtype=torch.bool)
    expected[5:15, 4:14] = True  # inclusive VOC xmax/ymax
    assert torch.equal(samples[f"{WNIDS[0]}_0"]["box_mask"], expected)
    assert not samples[f"{WNIDS[0]}_1"]["box_mask"].any()


def test_rerun_skips_finished_shards_and_redoes_a_lost_one(
    ilsvrc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shards"
    first = imagenet.convert(ilsvrc, "train", out, max_shard_count=4, progress=False)
    written: list[str] = []
    original = imagenet.write_shard

    def counting(job: imagenet.ShardJob) -> dict:
        written.append(job.name)
        return original(job)

    monkeypatch.setattr(imagenet, "write_shard", counting)
    again = imagenet.convert(ilsvrc, "train", out, max_shard_count=4, progress=False)
    assert written == [] and again.to_json() == first.to_json()
    (out / first.shards[2].name).unlink()
    imagenet.convert(ilsvrc, "train", out, max_shard_count=4, progress=False)
    assert written == [first.shards[2].name]
    imagenet.convert(
        ilsvrc, "train", out, options=imagenet.ConvertOptions(quality=70), max_shard_count=4, progress=False
    )
    assert len(written) == 1 + len(first.shards)  # other options: every shard is redone


def test_resize_shorter_side_and_scaled_boxes(ilsvrc: Path, tmp_path: Path) -> None:
    options = imagenet.ConvertOptions(resize_shorter=15, boxes=str(ilsvrc / "boxes"))
    imagenet.convert(ilsvrc, "train", tmp_path / "small", options=options, progress=False)
    samples = _read_all(tmp_path / "small")
    assert all(s["image"].shape == (3, 15, 20) for s in samples.values())
    box = samples[f"{WNIDS[0]}_0"]["box_mask"]
    assert box.sum() == 25 and box[2:7, 2:7].all()  # [4, 14) x [5, 15) halved


def test_flat_val_with_csv_labels_and_boxes(ilsvrc: Path, tmp_path: Path) -> None:
    manifest = imagenet.convert(ilsvrc, "val", tmp_path / "val", progress=False)
    assert manifest.samples == 2 and manifest.classes == WNIDS
    samples = _read_all(tmp_path / "val")
    assert samples["ILSVRC2012_val_00000001"]["label"].item() == 2
    assert samples["ILSVRC2012_val_00000002"]["label"].item() == 0
    assert samples["ILSVRC2012_val_00000001"]["box_mask"].sum() == 100


def test_cli_with_a_devkit_style_label_file(ilsvrc: Path, tmp_path: Path) -> None:
    (ilsvrc / "LOC_val_solution.csv").unlink()
    devkit_order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    (tmp_path / "synsets.txt").write_text("\n".join(f"{w} some name" for w in devkit_order) + "\n")
    (tmp_path / "truth.txt").write_text("1\n3\n")  # 1-based devkit ids: WNIDS[2], WNIDS[1]
    out = tmp_path / "val"
    labels_file, synsets_file = str(tmp_path / "truth.txt"), str(tmp_path / "synsets.txt")
    imagenet_cli.main(
        ["--root", str(ilsvrc), "--split", "val", "--out", str(out), "--val-labels", labels_file,
         "--synsets", synsets_file, "--label-base", "1"]
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["per_class"] == {WNIDS[1]: 1, WNIDS[2]: 1}
    labels = {k: s["label"].item() for k, s in _read_all(out).items()}
    assert labels == {"ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 1}


@pytest.mark.parametrize(
    ("lines", "label_base", "message"),
    [
        ("1\nseven\n", 0, "line 2: label 'seven' is not a wnid or an integer in [0, 2]"),
        ("1\n0\n", 1, "line 2: label 0 is out of range: expected a wnid or an integer in [1, 3]"),
        ("1\n\n4\n", 1, "line 3: label 4 is out of range"),  # blank lines keep their number
        ("-1\n", 0, "line 1: label -1 is out of range"),
    ],
    ids=["not-an-integer", "below-the-base", "above-the-last", "negative"],
)
def test_a_bad_integer_label_names_the_file_the_line_and_the_valid_range(
    ilsvrc: Path, tmp_path: Path, lines: str, label_base: int, message: str
) -> None:
    # A label below the base once indexed the class list from its end: 0 with base 1 became the last.
    (ilsvrc / "LOC_val_solution.csv").unlink()
    truth = tmp_path / "truth.txt"
    truth.write_text(lines)
    with pytest.raises(ValueError) as error:
        imagenet.convert(
            ilsvrc, "val", tmp_path / "val", val_labels=truth, label_base=label_base, progress=False
        )
    assert f"{truth}, {message}" in str(error.value)
    assert not (tmp_path / "val").exists()  # refused before anything is written


def _no_class_folders(root: Path) -> None:
    shutil.rmtree(root / "train")


def _no_val(root: Path) -> None:
    shutil.rmtree(root / "val")


def _no_val_labels(root: Path) -> None:
    (root / "LOC_val_solution.csv").unlink()


def _empty_class_folders(root: Path) -> None:
    for folder in (root / "train").iterdir():
        shutil.rmtree(folder)
        folder.mkdir()


def _labels_for_other_files(root: Path) -> None:
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nother,n01440764 0 0 9 9\n")


@pytest.mark.parametrize(
    ("damage", "split", "error", "message"),
    [
        (_no_class_folders, "val", ValueError,
         r"cannot tell the classes of .*ilsvrc: no ROOT/train/<wnid>/ or ROOT/val/<wnid>/ folders "
         r"\(a wnid is n and 8 digits, e.g. n01440764\) and no --synsets file"),
        (_no_val, "val", FileNotFoundError, r"ilsvrc/val does not exist \(expected ROOT/val/ under --root "),
        (_no_val_labels, "val", FileNotFoundError,
         r"ilsvrc/val has no <wnid>/ folders; give --val-labels \(or put LOC_val_solution.csv in ROOT\)"),
        (_empty_class_folders, "train", ValueError, r"no image files found under .*ilsvrc/train$"),
        (_labels_for_other_files, "val", ValueError,
         r"no image files found under .*ilsvrc/val; 2 left out, e.g. val/ILSVRC2012_val_00000001.JPEG: "
         r"no label in LOC_val_solution.csv"),
    ],
    ids=["no-classes", "no-split-folder", "flat-val-without-labels", "no-images", "no-labelled-images"],
)  # fmt: skip
def test_bad_input_folders_are_clear_errors(
    ilsvrc: Path, tmp_path: Path, damage: Callable[[Path], None], split: str, error: type, message: str
) -> None:
    damage(ilsvrc)
    with pytest.raises(error, match=message):
        imagenet.convert(ilsvrc, split, tmp_path / "out", progress=False)


def _members(tar: Path) -> list[str]:
    with tarfile.open(tar) as archive:
        return archive.getnames()


def test_shards_stay_under_max_shard_bytes_but_an_oversized_file_gets_its_own(
    ilsvrc: Path, tmp_path: Path
) -> None:
    big = ilsvrc / "train" / WNIDS[2] / f"{WNIDS[2]}_big.JPEG"
    big.write_bytes(_encode(_rgb(7, (240, 180))))
    bound = 3 * (len(_encode(_rgb(0))) + imagenet._TAR_OVERHEAD)  # about 3 small files
    assert big.stat().st_size > bound
    out = tmp_path / "shards"
    manifest = imagenet.convert(ilsvrc, "train", out, max_shard_bytes=bound, progress=False)
    source = {
        path.stem: path.stat().st_size
        for path in (ilsvrc / "train").rglob("*.JPEG")
        if "garbage" not in path.name
    }
    verbatim = 0
    for shard in manifest.shards:
        keys = {name.split(".")[0] for name in _members(out / shard.name)}
        planned = sum(source[key] + imagenet._TAR_OVERHEAD for key in keys)
        # The documented bound is on source bytes (plus a per-sample tar allowance); one file alone
        # may exceed it, and only then.
        assert planned <= bound or keys == {big.stem}, (shard.name, keys)
        if not any(odd in key for key in keys for odd in ("gray", "cmyk", "png")):
            # Stored byte for byte, a shard on disk holds no more than its plan, the 1024 zero bytes
            # that end a tar, and the padding to whole tar records: the allowance covers the headers
            # and the cls/json members. (Re-encoded files may grow: the bound is on source bytes.)
            records = -(-(planned + 1024) // tarfile.RECORDSIZE)
            assert (out / shard.name).stat().st_size <= records * tarfile.RECORDSIZE
            verbatim += 1
    assert verbatim >= 2
    members = [set(_members(out / s.name)) for s in manifest.shards]
    assert {f"{big.stem}.{m}" for m in ("cls", "jpg", "json")} in members  # alone in its shard
    assert any(len(m) == 3 * 3 for m in members)  # three small files do share one
    assert manifest.samples == 13


def test_val_in_wnid_folders_takes_labels_from_the_folders(ilsvrc: Path, tmp_path: Path) -> None:
    shutil.rmtree(ilsvrc / "val")
    (ilsvrc / "LOC_val_solution.csv").unlink()
    for c, wnid in [(0, WNIDS[2]), (1, WNIDS[0]), (2, WNIDS[0]), (3, "n09999999")]:
        folder = ilsvrc / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ILSVRC2012_val_{c:08d}.JPEG").write_bytes(_encode(_rgb(200 + c)))
    manifest = imagenet.convert(ilsvrc, "val", tmp_path / "val", progress=False)
    assert manifest.classes == WNIDS  # from ROOT/train, not from the val folders
    assert manifest.per_class == {WNIDS[0]: 2, WNIDS[2]: 1}
    assert manifest.skipped == [{"file": "val/n09999999", "reason": "unknown wnid"}]
    labels = {k: s["label"].item() for k, s in _read_all(tmp_path / "val").items()}
    assert labels == {
        "ILSVRC2012_val_00000000": 2,
        "ILSVRC2012_val_00000001": 0,
        "ILSVRC2012_val_00000002": 0,
    }
