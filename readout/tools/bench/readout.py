"""``readout.bench readout`` and ``ddp``: the readout's training step and heatmaps against the plain
classifier's, and one process against N under DDP."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from readout.backbones import load_classifier
from readout.readout_bottleneck import ReadoutBottleneck, readout_loss
from readout.tools.bench.timing import (
    PRECISIONS,
    compare,
    peak_memory_per_image,
    repeated,
    report,
    timed,
    under,
)
from readout.training.settings import finite_gradients, sample_noise


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


def readout_attributor(
    name: str,
    device: torch.device,
    batch_size: int,
    size: int | None = None,
    channels_last: bool = False,
    hidden: int | None = None,
) -> tuple[ReadoutBottleneck, dict[str, Any]]:
    """The product's readout for classifier ``name`` (random init) at ``size`` px (default: the
    classifier's), built as ``readout.fit`` builds it (the classifier's default layer and taps), on
    ``device``, and a batch of random images (:func:`bench_batch`) on which its μ/σ were estimated.
    ``hidden``: the readout net's first hidden width (default: the paper's)."""
    network = load_classifier(name, weights=None, input_size=size)
    network.input_size = size or network.input_size
    attributor = ReadoutBottleneck(network, hidden=hidden).to(device)
    if channels_last:
        attributor.classifier.to(memory_format=torch.channels_last)
    side = attributor.classifier.input_size
    images = torch.rand(batch_size, 3, side, side, device=device)
    attributor.estimate([images], progress=False)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return attributor, bench_batch(images)


def bench_batch(images: torch.Tensor) -> dict[str, Any]:
    """A batch of the data layer's format (image, label, key) around ``images``; labels all 0."""
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    return {"image": images, "label": labels, "key": [f"bench-{i:06d}" for i in range(len(images))]}


def readout_training_step(
    attributor: ReadoutBottleneck, batch: dict[str, Any], beta: float = 10.0, lr: float = 1e-5
) -> Callable[[], None]:
    """One optimisation step of the product, as ``readout.fit`` runs it outside Lightning's loop: the
    loss of :func:`readout.readout_bottleneck.readout_loss` (the shared first pass, the readout net,
    noise per sample key as :func:`readout.training.settings.sample_noise` draws it, CE + β/k·ΣKL), the
    check that it is finite, backward, the check that the readout net's gradients are finite, then
    Adam's step."""
    optimiser = torch.optim.Adam(attributor.net.parameters(), lr=lr)
    images, labels, keys = batch["image"], batch["label"], list(batch["key"])

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        out = readout_loss(attributor, images, labels, lambda f: sample_noise(keys, 0, f, 0), beta)
        if not bool(torch.isfinite(out.loss)):
            raise FloatingPointError("the readout's loss is not finite")
        out.loss.backward()
        if not finite_gradients(attributor.net):
            raise FloatingPointError("a gradient of the readout net is not finite")
        optimiser.step()

    return step


def with_two_full_passes(attributor: ReadoutBottleneck) -> ReadoutBottleneck:
    """A copy of ``attributor`` whose first pass also runs the layers up to the bottleneck a second time, as
    the reference code does (it runs the whole classifier again with the bottleneck inserted)."""
    copy = deepcopy(attributor)
    first_pass = copy.first_pass

    def two_passes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, _, readout = first_pass(images)
        with torch.no_grad():
            features = copy.features(images)
        return logits, features, readout

    copy.first_pass = two_passes  # type: ignore[method-assign]
    return copy


def with_compiled_suffix(attributor: ReadoutBottleneck) -> ReadoutBottleneck:
    """A copy of ``attributor`` whose layers after the bottleneck (the traced suffix of its split) are
    ``torch.compile``d."""
    copy = deepcopy(attributor)
    split = copy.split
    if split.suffix is None:
        raise ValueError("the classifier is not split at the bottleneck (hook path): nothing to compile")
    split.suffix = cast(torch.nn.Module, torch.compile(split.suffix))
    return copy


def bench_readout(args: argparse.Namespace) -> list[dict]:
    """Readout training step and heatmaps against a plain training step and plain inference."""
    device = torch.device(args.device)
    results = []
    for name in args.classifiers:
        attributor, batch = readout_attributor(name, device, args.batch, channels_last=args.channels_last)
        images = batch["image"]
        classifier, size = attributor.classifier, attributor.classifier.input_size
        variants = {
            "readout step (shared first pass)": attributor,
            "readout step (two full passes)": with_two_full_passes(attributor),
        }
        if args.compile:
            variants["readout step (compiled suffix)"] = with_compiled_suffix(attributor)
        narrow = {
            width: readout_attributor(
                name, device, args.batch, channels_last=args.channels_last, hidden=width
            )[0]
            for width in args.hidden
        }
        for width, other in narrow.items():
            variants[f"readout step (hidden {width})"] = other
        precisions = PRECISIONS if args.bf16 else {"fp32": None}
        title = f"readout, {name} at {size} px, batch {args.batch}"
        title += ", channels_last" if args.channels_last else ""
        for precision, dtype in precisions.items():
            candidates = {
                "plain training step": under(
                    dtype, device, plain_training_step(classifier, images, batch["label"])
                )
            }
            for variant, copy in variants.items():
                candidates[variant] = under(dtype, device, readout_training_step(copy, batch))
            train = compare(candidates, args.batch, args.repeats, device)
            memory = {n: peak_memory_per_image(fn, args.batch, device) for n, fn in candidates.items()}
            inference = {
                "plain inference": under(dtype, device, partial(torch.no_grad()(classifier), images)),
                "readout heatmaps": under(dtype, device, partial(attributor, images)),
            }
            for width, other in narrow.items():
                inference[f"readout heatmaps (hidden {width})"] = under(dtype, device, partial(other, images))
            infer = compare(
                inference,
                args.batch,
                args.repeats,
                device,
            )
            extra = {"mib_per_image": memory}
            results.append(
                report(f"{title}, {precision}: training", train, "plain training step", "images/s", extra)
            )
            results.append(report(f"{title}, {precision}: inference", infer, "plain inference", "images/s"))
        if args.bf16:
            step = {
                p: under(d, device, readout_training_step(attributor, batch)) for p, d in PRECISIONS.items()
            }
            direct = compare(
                {f"readout step, {p}": fn for p, fn in step.items()}, args.batch, args.repeats, device
            )
            results.append(report(f"{title}: bf16 against fp32", direct, "readout step, fp32", "images/s"))
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
    """The product's readout step alone and under DDP, on this rank's own images; and the image side in px.

    The finite-loss decision is not reduced over the ranks here (each rank checks its own): only the
    gradient all-reduce is added.
    """
    torch.manual_seed(0)  # the same classifier on every rank
    alone, batch = readout_attributor(args.classifier, device, args.batch)
    generator = torch.Generator().manual_seed(rank)  # each rank its own images, as under a sampler
    batch = bench_batch(torch.rand(batch["image"].shape, generator=generator).to(device))
    together = deepcopy(alone)
    # alpha() calls attributor.net: through the wrapper, DDP's forward arms the gradient all-reduce
    together.add_module("net", DistributedDataParallel(together.net))
    steps = {
        "1 process": readout_training_step(alone, batch),
        f"{args.processes} processes": readout_training_step(together, batch),
    }
    return steps, alone.classifier.input_size


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
