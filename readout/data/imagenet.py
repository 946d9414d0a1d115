"""ImageNet (ILSVRC2012) to shards, resumable.

``python -m readout.tools.imagenet --root DIR --split train|val --out DIR [--resize-shorter 256]
[--max-shard-bytes 5e8] [--boxes DIR] [--val-labels FILE] [--workers N]``

Layout read: ``ROOT/train/<wnid>/*.JPEG``; ``ROOT/val/<wnid>/*.JPEG`` or a flat ``ROOT/val/*.JPEG`` with a
label file: ``LOC_val_solution.csv`` (Kaggle; also gives boxes; found in ROOT by itself) or a text file
given by ``--val-labels`` whose lines are ``<label>`` (line i is ``ILSVRC2012_val_<i:08d>``) or
``<file name> <label>``. A label is a wnid or an integer index into ``--synsets`` (one wnid per line,
first token; default: the sorted wnids) counted from ``--label-base``. The official devkit file
``ILSVRC2012_validation_ground_truth.txt`` therefore needs ``--synsets <devkit order> --label-base 1``.
The class index is always the position in the sorted wnids (torchvision's: tench n01440764 = 0).
A label that is neither a wnid nor an integer in range is an error naming the file and the line.

Boxes: ``--boxes DIR`` holds PASCAL VOC XMLs as ``DIR/<wnid>/<stem>.xml`` or ``DIR/<stem>.xml``; a box
``xmin..xmax`` (inclusive pixel indices) becomes ``[xmin, xmax + 1)``, scaled to the stored image.

Files are converted to RGB: grayscale, CMYK and PNG-named-.JPEG files are decoded and re-encoded as JPEG;
an RGB JPEG that needs no resizing is stored byte for byte. A file that cannot be decoded is skipped
and listed with its reason in the manifest, never a crash. ``--resize-shorter S`` stores images with
their shorter side at most S (never upsampled).

Files are dealt to shards by a plan fixed by the file list and the options (sorted, shuffled with
``--seed`` so that every shard mixes classes, cut at ``--max-shard-bytes`` of *source* bytes or
``--max-shard-count`` files). Each shard is written to a temporary name and renamed when complete,
with a progress record in ``OUT/_progress/``; a rerun skips every shard whose record matches its
plan. Shards are written one by one with ``wds.TarWriter`` (not ``ShardWriter``, whose cuts depend on
what was written before, so a rerun could not skip finished shards).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from readout.atomic import atomic_local_file, atomic_write
from readout.data.format import MANIFEST_NAME, Box, Manifest, ShardInfo, encode_sample

WNID = re.compile(r"^n\d{8}$")
PROGRESS_DIR = "_progress"
_TAR_OVERHEAD = 3 * 1024  # tar headers and the cls/json members of one sample, roughly


@dataclass(frozen=True)
class SourceFile:
    """One image to convert. path: absolute; label: class index; nbytes: size on disk."""

    path: str
    key: str
    label: int
    wnid: str
    nbytes: int


@dataclass(frozen=True)
class ConvertOptions:
    """How files become samples; part of each shard's fingerprint, so changing one redoes the shards."""

    resize_shorter: int | None = None
    quality: int = 90
    boxes: str | None = None


class SkippedFile(Exception):
    """A source file that cannot be converted; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Listing


def class_list(root: Path, synsets: Path | None = None) -> list[str]:
    """The sorted wnids: from ``--synsets``, else the folders of ROOT/train, else of ROOT/val."""
    if synsets is not None:
        return sorted(_read_synsets(synsets))
    for split in ("train", "val"):
        folders = sorted(p.name for p in (root / split).glob("n*") if p.is_dir() and WNID.match(p.name))
        if folders:
            return folders
    raise ValueError(
        f"cannot tell the classes of {root}: no ROOT/train/<wnid>/ or ROOT/val/<wnid>/ folders "
        "(a wnid is n and 8 digits, e.g. n01440764) and no --synsets file"
    )


def _read_synsets(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def list_files(
    root: Path,
    split: str,
    classes: list[str],
    val_labels: Path | None = None,
    synsets: Path | None = None,
    label_base: int = 0,
) -> tuple[list[SourceFile], list[dict[str, str]], dict[str, list[Box]]]:
    """The files of a split with their labels, the files left out (and why), and boxes from a CSV label file.

    Returns (files, skipped as {"file", "reason"}, image stem -> boxes).
    """
    directory = root / split
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist (expected ROOT/{split}/ under --root {root})")
    index = {wnid: i for i, wnid in enumerate(classes)}
    folders = [p for p in directory.iterdir() if p.is_dir() and WNID.match(p.name)]
    if folders:
        labelled = [
            (f, p.name) for p in folders for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
        ]
        skipped = [
            {"file": str(p.relative_to(root)), "reason": "unknown wnid"}
            for p in folders
            if p.name not in index
        ]
        files = [_source(path, wnid, index) for path, wnid in labelled if wnid in index]
        return sorted(files, key=lambda f: f.key), skipped, {}
    if val_labels is None and (root / "LOC_val_solution.csv").is_file():
        val_labels = root / "LOC_val_solution.csv"
    if val_labels is None:
        raise FileNotFoundError(
            f"{directory} has no <wnid>/ folders; give --val-labels (or put LOC_val_solution.csv in ROOT)"
        )
    order = _read_synsets(synsets) if synsets is not None else classes
    labels, boxes = _read_labels(val_labels, order, label_base)
    files, skipped = [], []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        wnid = labels.get(path.stem)
        if wnid is None or wnid not in index:
            skipped.append({"file": str(path.relative_to(root)), "reason": f"no label in {val_labels.name}"})
            continue
        files.append(_source(path, wnid, index))
    return files, skipped, boxes


def _source(path: Path, wnid: str, index: dict[str, int]) -> SourceFile:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    return SourceFile(str(path.resolve()), key, index[wnid], wnid, path.stat().st_size)


def _read_labels(
    path: Path, order: list[str], label_base: int
) -> tuple[dict[str, str], dict[str, list[Box]]]:
    """Image stem -> wnid, and image stem -> boxes (only from LOC_val_solution-style CSVs)."""
    labels: dict[str, str] = {}
    boxes: dict[str, list[Box]] = {}
    if path.suffix == ".csv":
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                tokens = row["PredictionString"].split()
                labels[row["ImageId"]] = tokens[0]
                groups = [tokens[i : i + 5] for i in range(0, len(tokens) - 4, 5)]
                boxes[row["ImageId"]] = [
                    (float(x0), float(y0), float(x1) + 1, float(y1) + 1)
                    for w, x0, y0, x1, y1 in groups
                    if w == tokens[0]
                ]
        return labels, boxes
    count = 0  # non-blank lines so far: a one-token line i names ILSVRC2012_val_<i:08d>
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        count += 1
        stem, label = (
            (Path(parts[0]).stem, parts[1]) if len(parts) > 1 else (f"ILSVRC2012_val_{count:08d}", parts[0])
        )
        labels[stem] = (
            label if WNID.match(label) else _synset_at(label, order, label_base, f"{path}, line {number}")
        )
    return labels, boxes


def _synset_at(label: str, order: list[str], label_base: int, where: str) -> str:
    """The wnid of an integer label counted from ``label_base``, else a ValueError naming ``where``.

    where: "FILE, line N" of the label, for the message. Checked because a label below the base would
    otherwise index ``order`` from its end and silently pick the wrong class.
    """
    valid = f"a wnid or an integer in [{label_base}, {label_base + len(order) - 1}]"
    try:
        index = int(label) - label_base
    except ValueError:
        raise ValueError(f"{where}: label {label!r} is not {valid}") from None
    if not 0 <= index < len(order):
        raise ValueError(
            f"{where}: label {label} is out of range: expected {valid} "
            f"({len(order)} synsets counted from --label-base {label_base})"
        )
    return order[index]


# ---------------------------------------------------------------------------------------------------------
# Planning


def plan_shards(
    files: list[SourceFile], max_shard_bytes: float, max_shard_count: int, seed: int
) -> list[list[SourceFile]]:
    """Deals files to shards: a permutation fixed by ``seed``, cut by source bytes or count."""
    order = np.random.default_rng(seed).permutation(len(files))
    shards: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    size = 0
    for i in order:
        file = files[int(i)]
        cost = file.nbytes + _TAR_OVERHEAD
        if current and (size + cost > max_shard_bytes or len(current) >= max_shard_count):
            shards.append(current)
            current, size = [], 0
        current.append(file)
        size += cost
    if current:
        shards.append(current)
    return shards


def fingerprint(files: list[SourceFile], options: ConvertOptions) -> str:
    """A hash of what a shard should hold: its files (key, label, size) and the conversion options."""
    content = json.dumps([[f.key, f.label, f.nbytes] for f in files] + [asdict(options)])
    return hashlib.sha1(content.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Converting


def convert_file(
    file: SourceFile,
    options: ConvertOptions,
    boxes: list[Box] | None = None,
    problems: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """One source file -> tar members (see :mod:`readout.data.format`); raises SkippedFile if unreadable.

    boxes: in source pixels, else read from ``options.boxes``. A box file that cannot be parsed keeps
    the image without boxes and is reported in ``problems``.
    """
    try:
        data = Path(file.path).read_bytes()
    except OSError as error:
        raise SkippedFile(f"cannot read the file: {error}") from error
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            codec, mode, original_size = opened.format, opened.mode, opened.size
            image = opened.convert("RGB")
    except Exception as error:  # PIL raises many kinds on broken files
        raise SkippedFile(f"unreadable image: {type(error).__name__}: {error}") from error
    width, height = original_size
    if options.resize_shorter is not None and min(width, height) > options.resize_shorter:
        factor = options.resize_shorter / min(width, height)
        image = image.resize(
            (max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BICUBIC
        )
    if codec == "JPEG" and mode == "RGB" and image.size == original_size:
        encoded = data
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.quality)
        encoded = buffer.getvalue()
    if boxes is None:
        try:
            boxes = _xml_boxes(file, options.boxes, original_size)
        except (ElementTree.ParseError, ValueError) as error:
            reason = f"unreadable box file, image kept without boxes: {error}"
            (problems if problems is not None else []).append({"file": file.path, "reason": reason})
            boxes = []
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    scaled = [(x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y) for x0, y0, x1, y1 in boxes]
    return encode_sample(file.key, encoded, "jpg", file.label, file.wnid, scaled, image.size)


def _xml_boxes(file: SourceFile, directory: str | None, image_size: tuple[int, int]) -> list[Box]:
    """Boxes of a PASCAL VOC XML in image pixels, [xmin, xmax + 1) clamped to the image; [] if none."""
    if directory is None:
        return []
    stem = Path(file.path).stem
    candidates = [Path(directory) / file.wnid / f"{stem}.xml", Path(directory) / f"{stem}.xml"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return []
    tree = ElementTree.parse(path).getroot()
    width, height = image_size
    size = tree.find("size")
    if size is not None:
        annotated = (float(size.findtext("width") or width), float(size.findtext("height") or height))
    else:
        annotated = (float(width), float(height))
    sx, sy = width / annotated[0], height / annotated[1]
    objects = tree.findall("object")
    matching = [o for o in objects if o.findtext("name") == file.wnid] or objects
    boxes = []
    for obj in matching:
        box = obj.find("bndbox")
        if box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(tag) or 0) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(
            (max(0.0, x0 * sx), max(0.0, y0 * sy), min(width, (x1 + 1) * sx), min(height, (y1 + 1) * sy))
        )
    return boxes


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: where, which files, how, and its expected fingerprint."""

    out: str
    name: str
    files: list[SourceFile]
    options: ConvertOptions
    fingerprint: str
    csv_boxes: dict[str, list[Box]]


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Writes one shard under a temporary name, renames it when complete; returns its progress record."""
    out = Path(job.out)
    per_class: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    with (
        atomic_local_file(out / job.name) as temporary,
        wds.TarWriter(temporary, encoder=False, mtime=0) as writer,
    ):
        for file in job.files:
            try:
                boxes = job.csv_boxes.get(Path(file.path).stem)
                writer.write(convert_file(file, job.options, boxes, problems=skipped))
            except SkippedFile as error:
                skipped.append({"file": file.path, "reason": str(error)})
                continue
            per_class[file.wnid] += 1
    record = {
        "name": job.name,
        "fingerprint": job.fingerprint,
        "samples": sum(per_class.values()),
        "per_class": dict(per_class),
        "skipped": skipped,
    }
    atomic_write(str(out / PROGRESS_DIR / f"{job.name}.json"), json.dumps(record).encode())
    return record


def _finished(job: ShardJob) -> dict[str, Any] | None:
    """The progress record of a shard already written with the same plan, else None."""
    progress = Path(job.out) / PROGRESS_DIR / f"{job.name}.json"
    if not (Path(job.out) / job.name).is_file() or not progress.is_file():
        return None
    record = json.loads(progress.read_text())
    return record if record.get("fingerprint") == job.fingerprint else None


def convert(
    root: str | Path,
    split: str,
    out: str | Path,
    *,
    options: ConvertOptions = ConvertOptions(),
    max_shard_bytes: float = 5e8,
    max_shard_count: int = 10000,
    seed: int = 0,
    val_labels: str | Path | None = None,
    synsets: str | Path | None = None,
    label_base: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> Manifest:
    """Converts ROOT/split to shards in ``out`` plus ``manifest.json``; skips shards already finished."""
    root, out = Path(root), Path(out)
    synsets_path = Path(synsets) if synsets is not None else None
    classes = class_list(root, synsets_path)
    labels_path = Path(val_labels) if val_labels is not None else None
    files, skipped, csv_boxes = list_files(root, split, classes, labels_path, synsets_path, label_base)
    if not files:
        left_out = (
            f"; {len(skipped)} left out, e.g. {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        )
        raise ValueError(f"no image files found under {root / split}{left_out}")
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    plan = plan_shards(files, max_shard_bytes, max_shard_count, seed)
    jobs = [
        ShardJob(
            str(out),
            f"imagenet-{split}-{i:06d}.tar",
            shard,
            options,
            fingerprint(shard, options),
            {
                Path(f.path).stem: csv_boxes[Path(f.path).stem]
                for f in shard
                if Path(f.path).stem in csv_boxes
            },
        )
        for i, shard in enumerate(plan)
    ]
    records = {job.name: record for job in jobs if (record := _finished(job)) is not None}
    pending = [job for job in jobs if job.name not in records]
    sizes = {job.name: len(job.files) for job in pending}
    with tqdm(total=sum(sizes.values()), unit="img", disable=not progress, desc=f"imagenet {split}") as bar:
        for record in _run(pending, workers):
            records[record["name"]] = record
            bar.update(sizes[record["name"]])
    manifest = _manifest(
        jobs, records, classes, skipped, root, split, options, max_shard_bytes, max_shard_count, seed
    )
    manifest.write(str(out / MANIFEST_NAME))
    return manifest


def _run(jobs: list[ShardJob], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from map(write_shard, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap_unordered(write_shard, jobs)


def _manifest(
    jobs: list[ShardJob],
    records: dict[str, dict[str, Any]],
    classes: list[str],
    skipped: list[dict[str, str]],
    root: Path,
    split: str,
    options: ConvertOptions,
    max_shard_bytes: float,
    max_shard_count: int,
    seed: int,
) -> Manifest:
    per_class: Counter[str] = Counter()
    for record in records.values():
        per_class.update(record["per_class"])
        skipped = skipped + [
            {"file": os.path.relpath(s["file"], root), "reason": s["reason"]} for s in record["skipped"]
        ]
    source = {
        "dataset": "ILSVRC2012",
        "split": split,
        "root": str(root),
        "files": sum(len(job.files) for job in jobs),
        "max_shard_bytes": max_shard_bytes,
        "max_shard_count": max_shard_count,
        "seed": seed,
        **asdict(options),
    }
    return Manifest(
        classes=classes,
        shards=[ShardInfo(job.name, records[job.name]["samples"]) for job in jobs],
        per_class={wnid: per_class[wnid] for wnid in classes if per_class[wnid]},
        skipped=skipped,
        source=source,
    )
