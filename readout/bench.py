"""``python -m readout.bench {per-sample,readout,ddp,data}``: speed ratios measured side by side in one run.

Each subcommand times two or more implementations on the same inputs, in the same process, warmed
up, alternating the order of repeats, and prints the throughputs and their ratio; absolute
numbers alone are never the result (CPU timings here are noisy, the ratio much less so).
``--device cuda`` where a GPU is present; peak GPU memory per image is printed there.

- ``per-sample``: batched, cached Per-Sample Bottleneck against the straightforward one.
- ``readout``: readout training step and heatmaps against the plain classifier's step and inference.
- ``ddp``: readout training on 1 process against N under DDP, as a scaling efficiency.
- ``data``: shards stored at full size against resized, loader worker counts, PIL against batched
  JPEG decode (on the GPU where one is present).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

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


def bench_ddp(args: argparse.Namespace) -> list[dict]:
    """Readout training images/s on 1 process against N under DDP, same batch per process: scaling efficiency.

    One launch of N processes (gloo on CPU, NCCL on N CUDA devices), each limited to ``--threads``
    threads, so on the CPU the comparison is per core. Rank 0 alone runs the plain training step
    (no DDP) while the others wait at a barrier; then all N run the DDP step, whose gradient
    all-reduce is the only thing added. Windows alternate as in :func:`compare`. Images are random
    tensors in memory: this times the training step, ``data`` times the loader.
    """
    device = torch.device(args.device)
    if args.processes < 2:
        raise SystemExit(f"--processes must be at least 2, got {args.processes}")
    if device.type == "cuda" and torch.cuda.device_count() < args.processes:
        raise SystemExit(
            f"--processes {args.processes} needs as many CUDA devices, found {torch.cuda.device_count()}"
        )
    with tempfile.TemporaryDirectory() as directory:
        torch.multiprocessing.spawn(ddp_worker, args=(args, directory), nprocs=args.processes, join=True)
        measured = json.loads((Path(directory) / "rates.json").read_text())
    rates, cores, size = measured["rates"], measured["cores"], measured["size"]
    single, many = rates.values()
    efficiency = many / (args.processes * single)
    backend = "nccl" if device.type == "cuda" else "gloo"
    title = (
        f"ddp, {args.classifier} readout training at {size} px, batch {args.batch} per process, "
        f"{args.threads} thread(s) per process, {backend}"
    )
    extra = {
        "scaling_efficiency": efficiency,
        "processes": args.processes,
        "threads_per_process": args.threads,
        "cores_busy": cores,
        # on a shared CPU the N processes may get less than N cores; this ratio does not depend on it
        "images_per_cpu_second": {name: rates[name] / cores[name] for name in rates},
    }
    result = report(title, rates, next(iter(rates)), "images/s", extra)
    print(f"  scaling efficiency = {many:.2f} / ({args.processes} x {single:.2f}) = {efficiency:.2f}")
    busy = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    print(f"  CPU cores busy (CPU s / wall s, summed over processes): {busy}")
    per_cpu = ", ".join(f"{name} {value:.1f}" for name, value in extra["images_per_cpu_second"].items())
    print(f"  images per CPU second: {per_cpu}")
    return [result]


def ddp_worker(rank: int, args: argparse.Namespace, directory: str) -> None:
    """One process of :func:`bench_ddp`; rank 0 writes the rates to ``directory/rates.json``."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{directory}/rendezvous",
        rank=rank,
        world_size=args.processes,
    )
    try:
        measured = ddp_rates(rank, args, device)
        if rank == 0:
            (Path(directory) / "rates.json").write_text(json.dumps(measured))
    finally:
        dist.destroy_process_group()


def ddp_steps(rank: int, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable], int]:
    """The plain readout step and the DDP one, on this rank's own images; and the image side in px."""
    torch.manual_seed(0)
    classifier = load_classifier(args.classifier, weights=None).to(device)
    size = classifier.input_size
    alone, together = ReadoutBottleneck(classifier).to(device), ReadoutBottleneck(classifier).to(device)
    generator = torch.Generator().manual_seed(rank)  # each rank its own images, as under a sampler
    images = torch.rand(args.batch, 3, size, size, generator=generator).to(device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    for readout in (alone, together):
        readout.estimate([images], progress=False)
    # alpha() calls self.net: through the wrapper, DDP's forward arms the gradient all-reduce
    together.add_module("net", DistributedDataParallel(together.net))
    steps = {
        "1 process": readout_training_step(alone, images, labels, True, alone.suffix),
        f"{args.processes} processes": readout_training_step(together, images, labels, True, together.suffix),
    }
    return steps, size


def ddp_rates(rank: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Rank 0 alone (plain step) and all ranks together (DDP step), medians over the windows.

    Returns {"rates": name -> images/s, "cores": name -> CPU seconds of the ranks per wall second,
    "size": px}; the cores show how much CPU the processes got on a shared machine. Only rank 0's
    rates are complete.
    """
    steps, size = ddp_steps(rank, args, device)
    names = list(steps)
    if rank == 0:
        steps[names[0]]()
    steps[names[1]]()
    walls: dict[str, list[float]] = {name: [] for name in names}
    cores: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            dist.barrier()
            if name == names[0] and rank != 0:
                continue  # waits at the next barrier, asleep
            cpu = time.process_time()
            wall = torch.tensor(timed(partial(repeated, steps[name], args.steps), device), device=device)
            used = torch.tensor(time.process_time() - cpu, device=device)
            if name == names[1]:  # the slowest rank sets the pace; the CPU is what all ranks used
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(used, op=dist.ReduceOp.SUM)
            walls[name].append(float(wall))
            cores[name].append(float(used) / float(wall))
    dist.barrier()
    per_window = {names[0]: args.batch * args.steps, names[1]: args.processes * args.batch * args.steps}
    return {
        "rates": {name: per_window[name] / statistics.median(walls[name]) for name in names if walls[name]},
        "cores": {name: statistics.median(cores[name]) for name in names if cores[name]},
        "size": size,
    }


def repeated(fn: Callable[[], object], times: int) -> None:
    for _ in range(times):
        fn()


def bench_data(args: argparse.Namespace) -> list[dict]:
    """Images/s through decode and the training transform: shards stored at full size against resized,
    by worker count, and JPEG decode one by one (PIL) against batched (torchvision, GPU where present)."""
    with tempfile.TemporaryDirectory() as directory:
        stored = write_stored_sizes(Path(directory), args.images, args.full_size, args.resize_shorter)
        results = [bench_stored_sizes(args, stored)]
        full = next(iter(stored))
        if args.shards:
            results.append(bench_workers(args, args.shards, args.shards))
        else:
            results.append(bench_workers(args, stored[full], f"JPEGs {full}"))
        results.append(bench_decode(args, stored[full]))
    return results


def write_stored_sizes(directory: Path, n: int, full_size: int, resize_shorter: int) -> dict[str, Path]:
    """The same ``n`` JPEGs converted to shards by :mod:`readout.data.imagenet`, as stored and resized.

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


def bench_decode(args: argparse.Namespace, shards: Path) -> dict:
    """JPEG bytes -> RGB pixels: PIL one by one (the reader's path) against torchvision's batched decode."""
    from readout.data.format import decode_image, decode_jpegs

    data = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member) if member.name.endswith(".jpg") else None
                if extracted is not None:
                    data.append(extracted.read())
    data = data[: args.batch]
    device = torch.device(args.device)
    candidates: dict[str, Callable[[], object]] = {
        "PIL, one by one (CPU)": lambda: [decode_image(item) for item in data],
        "decode_jpeg, batched (cpu)": partial(decode_jpegs, data, "cpu"),
    }
    if device.type == "cuda":
        candidates[f"decode_jpeg, batched ({device})"] = partial(decode_jpegs, data, device)
    rates = compare(candidates, len(data), args.repeats, device)
    return report(f"decode, {len(data)} JPEGs at {args.full_size} px", rates, next(iter(rates)), "images/s")


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
    ddp = commands.add_parser("ddp", help="readout training images/s, 1 process against N under DDP")
    ddp.add_argument("--classifier", default="synthetic-cnn")
    ddp.add_argument("--processes", type=int, default=2)
    ddp.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ddp.add_argument("--batch", type=int, default=16, help="images per process and step")
    ddp.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    ddp.set_defaults(run=bench_ddp)
    data = commands.add_parser("data", help="images/s through decode and the training transform")
    data.add_argument(
        "--shards", help="shards for the worker counts (default: the full-size ones written here)"
    )
    data.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    data.add_argument("--batch", type=int, default=64)
    data.add_argument("--batches", type=int, default=10, help="batches per timed pass")
    data.add_argument("--size", type=int, default=224)
    data.add_argument("--images", type=int, default=64, help="JPEGs written for the stored-size comparison")
    data.add_argument("--full-size", type=int, default=512, help="side of the full-size stand-in, px")
    data.add_argument(
        "--resize-shorter", type=int, default=256, help="shorter side of the resized shards, px"
    )
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
