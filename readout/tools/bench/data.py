"""``readout.bench data``: shards at full size against resized, loader workers, PIL against batched
JPEG decode, and the loader against the readout training step it has to feed."""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from readout.tools.bench.readout import readout_attributor, readout_training_step
from readout.tools.bench.timing import PRECISIONS, compare, report, under


def bench_data(args: argparse.Namespace) -> list[dict]:
    """Images/s through decode and the training transform: shards stored at full size against resized,
    by worker count, JPEG decode and the train transform one by one (PIL) against batched (torchvision,
    GPU where present), and the loader of each worker count against the readout training step it has
    to feed."""
    with tempfile.TemporaryDirectory() as directory:
        stored = write_stored_sizes(Path(directory), args.images, args.full_size, args.resize_shorter)
        results = [bench_stored_sizes(args, stored)]
        full = next(iter(stored))
        if args.shards:
            loader = bench_workers(args, args.shards, args.shards)
        else:
            loader = bench_workers(args, stored[full], f"JPEGs {full}")
        results += [loader, bench_decode(args, stored[full]), bench_device_transform(args, stored[full])]
        results.append(bench_loader_against_step(args, loader))
    return results


def write_stored_sizes(directory: Path, n: int, full_size: int, resize_shorter: int) -> dict[str, Path]:
    """The same ``n`` JPEGs converted to shards by :mod:`readout.tools.imagenet`, as stored and resized.

    Stand-in for ImageNet photos: synthetic images (224 px at most) upscaled bicubically to
    ``full_size`` px square, saved as JPEG quality 90 in ``ROOT/train/<wnid>/``. Returns label -> shards.
    """
    from readout.data.imagenet import ConvertOptions, convert
    from readout.data.synthetic import MAX_SIZE, generate

    root = directory / "jpegs"
    for sample in generate(n, MAX_SIZE, seed=0):
        folder = root / "train" / f"n{sample.label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(sample.image).resize((full_size, full_size), Image.Resampling.BICUBIC)
        image.save(folder / f"{sample.key}.JPEG", quality=90)
    stored = {
        f"stored at full size ({full_size} px)": ConvertOptions(),
        f"stored resized (shorter side {resize_shorter})": ConvertOptions(resize_shorter=resize_shorter),
    }
    out = {}
    for i, (label, options) in enumerate(stored.items()):
        out[label] = directory / f"shards-{i}"
        convert(root, "train", out[label], options=options, progress=False)
    return out


def bench_stored_sizes(args: argparse.Namespace, stored: dict[str, Path]) -> dict:
    """Shards of the same images stored at full size and resized: read, decoded and transformed in this
    process on one thread, as in a DataLoader worker (torch gives each one thread)."""
    from readout.data.shards import make_loader
    from readout.data.transforms import train_transform

    candidates: dict[str, Callable[[], object]] = {}
    for label, shards in stored.items():
        loader = make_loader(
            shards,
            "train",
            args.batch,
            0,
            transform=train_transform(args.size),
            batches_per_epoch=args.batches,
            # a real epoch fills the buffer once; filling 1000 in every short window would dominate it
            shuffle_buffer=args.batch,
        )
        candidates[label] = partial(drain, loader)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = compare(candidates, args.batch * args.batches, args.repeats, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    title = f"data, {args.images} JPEGs stored full size and resized, train transform to {args.size} px"
    title += ", in-process, 1 thread"
    return report(title, rates, next(iter(rates)), "images/s")


def drain(loader: Iterable[dict]) -> int:
    return sum(len(batch["label"]) for batch in loader)


def bench_workers(args: argparse.Namespace, shards: str | Path, name: str) -> dict:
    """Images/s from ``shards`` (``name`` in the title) through decode and the train transform, by workers."""
    from readout.data.shards import make_loader
    from readout.data.transforms import train_transform

    rates: dict[str, float] = {}
    for workers in args.workers:
        loader = make_loader(
            shards,
            "train",
            args.batch,
            workers,
            transform=train_transform(args.size),
            batches_per_epoch=args.batches,
            persistent_workers=False,
        )
        started = time.perf_counter()
        count = drain(loader)
        rates[f"{workers} worker(s)"] = count / (time.perf_counter() - started)
    return report(f"data, {name}, train transform to {args.size} px", rates, next(iter(rates)), "images/s")


def bench_loader_against_step(args: argparse.Namespace, loader: dict) -> dict:
    """The loader's images/s for each worker count (``loader``: :func:`bench_workers`' result) against
    the product's readout training step (:func:`readout_training_step`) of ``--classifier`` at the same
    image size and batch, on ``--device``. loader / step >= 1: the loader keeps the step fed."""
    device = torch.device(args.device)
    attributor, batch = readout_attributor(args.classifier, device, args.batch, args.size, args.channels_last)
    precision = "bf16" if args.bf16 else "fp32"
    step = "readout training step"
    rates = compare(
        {step: under(PRECISIONS[precision], device, readout_training_step(attributor, batch))},
        args.batch,
        args.repeats,
        device,
    )
    rates.update(loader["rates"])
    ratios = {name: rate / rates[step] for name, rate in loader["rates"].items()}
    layout = ", channels_last" if args.channels_last else ""
    title = (
        f"data, loader against the readout training step of {args.classifier} at {args.size} px, "
        f"batch {args.batch}, {precision}{layout}, on {device}"
    )
    return report(title, rates, step, "images/s", {"loader_over_step": ratios})


def raw_samples(shards: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of the shards in ``shards/*.tar`` as the reader hands them over: member
    suffix -> bytes, and ``__key__`` (webdataset splits a member name at the first dot)."""
    samples: dict[str, dict[str, Any]] = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member)
                if extracted is not None:
                    key, _, suffix = member.name.partition(".")
                    samples.setdefault(key, {"__key__": key})[suffix] = extracted.read()
    return list(samples.values())[:n]


def bench_decode(args: argparse.Namespace, shards: Path) -> dict:
    """JPEG bytes -> RGB pixels: PIL one by one (the reader's path) against torchvision's batched decode."""
    from readout.data.format import decode_image, decode_jpegs

    data = [raw["jpg"] for raw in raw_samples(shards, args.batch)]
    device = torch.device(args.device)
    candidates: dict[str, Callable[[], object]] = {
        "PIL, one by one (CPU)": lambda: [decode_image(item) for item in data],
        "decode_jpeg, batched (cpu)": partial(decode_jpegs, data, "cpu"),
    }
    if device.type == "cuda":
        candidates[f"decode_jpeg, batched ({device})"] = partial(decode_jpegs, data, device)
    rates = compare(candidates, len(data), args.repeats, device)
    return report(f"decode, {len(data)} JPEGs at {args.full_size} px", rates, next(iter(rates)), "images/s")


def bench_device_transform(args: argparse.Namespace, shards: Path) -> dict:
    """Decode + train transform of one batch: the reader's CPU path (PIL and the transform, one sample
    after another, then collated) against the device path (:class:`DeviceTrainTransform`: crops drawn
    from the headers, then one batched decode and the crops on the device), same settings."""
    from torch.utils.data import default_collate

    from readout.data.device_decode import DeviceTrainTransform, raw_jpeg
    from readout.data.format import decode_sample
    from readout.data.transforms import train_transform, transform_sample

    raws = raw_samples(shards, args.batch)
    cpu, on_device = train_transform(args.size), DeviceTrainTransform(args.size)

    def cpu_path() -> object:
        return default_collate([transform_sample(decode_sample(raw), cpu) for raw in raws])

    def device_path(device: torch.device) -> object:
        elements = [on_device.element(raw_jpeg(raw)) for raw in raws]
        return on_device.apply(default_collate(elements), device)

    device = torch.device(args.device)
    candidates: dict[str, Callable[[], object]] = {
        "PIL + train transform, one by one (CPU)": cpu_path,
        "decode_jpeg + train crops, batched (cpu)": partial(device_path, torch.device("cpu")),
    }
    if device.type == "cuda":
        candidates[f"decode_jpeg + train crops, batched ({device})"] = partial(device_path, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker; several threads only fight over such small images
    try:
        rates = compare(candidates, len(raws), args.repeats, device)
    finally:
        torch.set_num_threads(threads)
    title = f"decode + train transform to {args.size} px, {len(raws)} JPEGs at {args.full_size} px, 1 thread"
    return report(title, rates, next(iter(rates)), "images/s")
