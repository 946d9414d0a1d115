"""``python -m readout.bench {per-sample,readout,data}``: speed as ratios measured side by side in one run.

Each subcommand times two or more implementations on the same inputs, in the same process, warmed
up, alternating the order of repeats, and prints the throughputs and their ratio; absolute
numbers alone are never the result (CPU timings here are noisy, the ratio much less so).
``--device cuda`` where a GPU is present; peak GPU memory per image is printed there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from readout.backbones import load_classifier
from readout.per_sample import PerSample
from readout.readout_bottleneck import ReadoutBottleneck
from readout.reference import straightforward_heatmaps


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronise(device)
    started = time.perf_counter()
    fn()
    synchronise(device)
    return time.perf_counter() - started


def compare(
    candidates: dict[str, Callable[[], object]], items: int, repeats: int, device: torch.device
) -> dict:
    """Items per second of each candidate: median over ``repeats`` after one warm-up, order alternated."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            times[name].append(timed(candidates[name], device))
    return {name: items / statistics.median(values) for name, values in times.items()}


def peak_memory_per_image(fn: Callable[[], object], items: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / items / 2**20


def report(title: str, rates: dict[str, float], baseline: str, unit: str, extra: dict | None = None) -> dict:
    print(f"\n{title}")
    for name, rate in rates.items():
        print(f"  {name:<40} {rate:10.2f} {unit}   {rate / rates[baseline]:6.2f}x {baseline}")
    return {"title": title, "rates": rates, "baseline": baseline, "unit": unit, **(extra or {})}


# ---------------------------------------------------------------------------------------------------------


def bench_per_sample(args: argparse.Namespace) -> list[dict]:
    """Batched, cached Per-Sample Bottleneck against the straightforward one, same images and noise."""
    device = torch.device(args.device)
    results = []
    for name in args.classifiers:
        classifier = load_classifier(name, weights=None).to(device)
        size = classifier.input_size
        for batch in args.batch_sizes:
            attributor = PerSample(classifier, steps=args.steps, copies=args.copies).to(device)
            images = torch.rand(batch, 3, size, size, device=device)
            attributor.estimate([torch.rand(8, 3, size, size, device=device)], progress=False)
            target = torch.zeros(batch, dtype=torch.long, device=device)
            noise = torch.randn(args.steps, batch, args.copies, *attributor.shape, device=device)
            rates = compare(
                {
                    "batched + cached": partial(attributor.explain, images, target, noise=noise),
                    "straightforward (one image, full model)": partial(
                        straightforward_heatmaps, attributor, images, target, noise
                    ),
                },
                batch,
                args.repeats,
                device,
            )
            title = (
                f"per-sample, {name} at {size} px, {batch} images, {args.steps} steps x {args.copies} copies"
            )
            results.append(report(title, rates, "straightforward (one image, full model)", "heatmaps/s"))
    return results


def plain_training_step(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable:
    """A training step of the classifier itself: every weight gets a gradient (the reference point)."""
    trainable = [p for p in classifier.parameters()]
    optimiser = torch.optim.SGD(trainable, lr=1e-6)

    def step() -> None:
        classifier.requires_grad_(True)
        loss = F.cross_entropy(classifier(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        classifier.requires_grad_(False)

    return step


def readout_training_step(readout: ReadoutBottleneck, images, labels, shared: bool, suffix) -> Callable:
    optimiser = torch.optim.Adam(readout.net.parameters(), lr=1e-5)

    def step() -> None:
        logits, features, taps = readout.first_pass(images)
        if not shared:  # the reference code runs the whole classifier again with the bottleneck inserted
            with torch.no_grad():
                features = readout.prefix(readout.classifier.normalize(images))
        z, kl = readout.bottleneck(features, readout.alpha(taps), torch.randn_like(features))
        loss = F.cross_entropy(suffix(z), labels) + kl.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def bench_readout(args: argparse.Namespace) -> list[dict]:
    """Readout training step and heatmaps against a plain training step and plain inference."""
    device = torch.device(args.device)
    results = []
    for name in args.classifiers:
        classifier = load_classifier(name, weights=None).to(device)
        size = classifier.input_size
        readout = ReadoutBottleneck(classifier).to(device)
        images = torch.rand(args.batch, 3, size, size, device=device)
        labels = torch.zeros(args.batch, dtype=torch.long, device=device)
        readout.estimate([images], progress=False)
        if args.channels_last:
            classifier.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        precisions = {"fp32": None, "bf16": torch.bfloat16} if args.bf16 else {"fp32": None}
        for precision, dtype in precisions.items():
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
            suffix = readout.suffix
            candidates = {
                "plain training step": plain_training_step(classifier, images, labels),
                "readout step (shared first pass)": readout_training_step(
                    readout, images, labels, True, suffix
                ),
                "readout step (two full passes)": readout_training_step(
                    readout, images, labels, False, suffix
                ),
            }
            if args.compile:
                compiled = torch.compile(suffix)
                candidates["readout step (compiled suffix)"] = readout_training_step(
                    readout, images, labels, True, compiled
                )
            with autocast:
                train = compare(candidates, args.batch, args.repeats, device)
                memory = {n: peak_memory_per_image(fn, args.batch, device) for n, fn in candidates.items()}
                infer = compare(
                    {
                        "plain inference": partial(torch.no_grad()(classifier), images),
                        "readout heatmaps": partial(readout, images),
                    },
                    args.batch,
                    args.repeats,
                    device,
                )
            title = f"readout, {name} at {size} px, batch {args.batch}, {precision}"
            results.append(
                report(
                    f"{title}: training", train, "plain training step", "images/s", {"mib_per_image": memory}
                )
            )
            results.append(report(f"{title}: inference", infer, "plain inference", "images/s"))
    return results


def bench_data(args: argparse.Namespace) -> list[dict]:
    """Images/s from shards through decode and the training transforms, by worker count."""
    from readout.data.shards import make_loader
    from readout.data.transforms import train_transform

    results = []
    rates: dict[str, float] = {}
    for workers in args.workers:
        loader = make_loader(
            args.shards,
            "train",
            args.batch,
            workers,
            transform=train_transform(args.size),
            batches_per_epoch=args.batches,
            persistent_workers=False,
        )
        started = time.perf_counter()
        count = sum(len(batch["label"]) for batch in loader)
        rates[f"{workers} worker(s)"] = count / (time.perf_counter() - started)
    results.append(report(f"data, {args.shards} at {args.size} px", rates, next(iter(rates)), "images/s"))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m readout.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    per_sample = commands.add_parser("per-sample", help=bench_per_sample.__doc__)
    per_sample.add_argument("--classifiers", nargs="+", default=["synthetic-cnn", "resnet50"])
    per_sample.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    per_sample.add_argument("--steps", type=int, default=10)
    per_sample.add_argument("--copies", type=int, default=10)
    per_sample.set_defaults(run=bench_per_sample)
    readout = commands.add_parser("readout", help=bench_readout.__doc__)
    readout.add_argument("--classifiers", nargs="+", default=["synthetic-cnn", "resnet50"])
    readout.add_argument("--batch", type=int, default=16)
    readout.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    readout.add_argument("--compile", action="store_true", help="also time torch.compile of the suffix")
    readout.add_argument("--channels-last", action="store_true")
    readout.set_defaults(run=bench_readout)
    data = commands.add_parser("data", help=bench_data.__doc__)
    data.add_argument("--shards", required=True)
    data.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    data.add_argument("--batch", type=int, default=64)
    data.add_argument("--batches", type=int, default=20)
    data.add_argument("--size", type=int, default=224)
    data.set_defaults(run=bench_data)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"readout.bench {args.command} on {device}, {started}, torch {torch.__version__}")
    results = args.run(args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "date": started, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
