"""``python -m readout.bench {per-sample,relevance,readout,ddp,data}``: speed ratios, side by side.

Each subcommand times two or more implementations on the same inputs, in the same process, warmed
up, alternating the order of repeats, and prints the throughputs and their ratio; absolute
numbers alone are never the result (CPU timings here are noisy, the ratio much less so).
``--device cuda`` where a GPU is present; peak GPU memory per image is printed there.

- ``per-sample``: batched, cached Per-Sample Bottleneck against the straightforward one; fp32 eager,
  bf16 autocast and compiled steps side by side.
- ``relevance``: Relevance-IBA's LRP pass in fp32 and in bf16 autocast, with its conservation.
- ``readout``: readout training step and heatmaps against the plain classifier's step and inference.
- ``ddp``: readout training on 1 process against N under DDP, as a scaling efficiency.
- ``data``: shards stored at full size against resized, loader worker counts, PIL against batched
  JPEG decode and train crops (on the GPU where one is present), and the loader against the readout
  training step it has to feed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from readout.backbones import load_classifier
from readout.lit import ReadoutModule
from readout.logs import show_info
from readout.per_sample import PerSample
from readout.precision import native_bf16
from readout.reference import straightforward_heatmaps
from readout.resources import checkpoint_dir


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
    candidates: Mapping[str, Callable[[], object]], items: int, repeats: int, device: torch.device
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


#: The bench's Per-Sample variants beyond fp32 eager: (row name, precision, compile).
VARIANTS = {
    "bf16": ("batched + cached, bf16 autocast", "bf16", False),
    "compiled": ("batched + cached, compiled", "fp32", True),
    "compiled-bf16": ("batched + cached, compiled, bf16 autocast", "bf16", True),
}


def _variant(
    classifier: Any,
    args: argparse.Namespace,
    device: torch.device,
    precision: str = "fp32",
    compile: bool = False,
    fuse: bool = True,
) -> PerSample:
    return PerSample(
        classifier,
        steps=args.steps,
        copies=args.copies,
        fuse=fuse,
        precision=precision,  # type: ignore[arg-type]
        compile=compile,
    ).to(device)


def bench_per_sample(args: argparse.Namespace) -> list[dict]:
    """Batched, cached Per-Sample Bottleneck against the straightforward one, same images and noise;
    with ``--variants``, also in bf16 autocast and compiled (the compile time is reported, not timed)."""
    device = torch.device(args.device)
    results = []
    for name in args.classifiers:
        classifier = load_classifier(name, weights=None).to(device)
        size = classifier.input_size
        for batch in args.batch_sizes:
            make = partial(_variant, classifier, args, device)
            attributor = make()
            images = torch.rand(batch, 3, size, size, device=device)
            attributor.estimate([torch.rand(8, 3, size, size, device=device)], progress=False)
            own = make(fuse=False)
            own.load_state_dict(attributor.state_dict())
            hooked = PerSample(
                classifier.with_split("hook"),
                attributor.layer,
                steps=args.steps,
                copies=args.copies,
                precision="fp32",
            )
            hooked.load_state_dict(attributor.state_dict())
            target = torch.zeros(batch, dtype=torch.long, device=device)
            noise = torch.randn(args.steps, batch, args.copies, *attributor.shape, device=device)
            candidates: dict[str, Callable[[], object]] = {
                "batched + cached": partial(attributor.explain, images, target, noise=noise),
                "batched + cached, batch norm not folded": partial(own.explain, images, target, noise=noise),
                "batched, hook path (full model per step)": partial(
                    hooked.explain, images, target, noise=noise
                ),
            }
            variants = {}
            chosen = args.variants
            if chosen is None:
                chosen = ["compiled", *(["bf16", "compiled-bf16"] if native_bf16(device) else [])]
            for variant in chosen:
                row, precision, compile = VARIANTS[variant]
                variants[row] = make(precision, compile)
                variants[row].load_state_dict(attributor.state_dict())
                candidates[row] = partial(variants[row].explain, images, target, noise=noise)
            candidates["straightforward (one image, full model)"] = partial(
                straightforward_heatmaps, attributor, images, target, noise
            )
            rates = compare(candidates, batch, args.repeats, device)
            compile_seconds = {
                row: sum(v._compiled[1].seconds.values()) if v._compiled else None
                for row, v in variants.items()
                if v.compile_steps
            }
            for row, seconds in compile_seconds.items():
                if seconds is not None:
                    print(
                        f"  compile time of {row!r}: {seconds:.1f} s (once per classifier, layer and shape)"
                    )
            title = (
                f"per-sample, {name} at {size} px, {batch} images, {args.steps} steps x {args.copies} copies"
            )
            extra = {"compile_seconds": compile_seconds, "native_bf16": native_bf16(device)}
            results.append(
                report(title, rates, "straightforward (one image, full model)", "heatmaps/s", extra)
            )
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


def readout_module(
    name: str,
    device: torch.device,
    batch_size: int,
    size: int | None = None,
    channels_last: bool = False,
    hidden: int | None = None,
) -> tuple[ReadoutModule, dict[str, Any]]:
    """The product's module for classifier ``name`` (random init) at ``size`` px (default: the
    classifier's), on ``device``, attached to a :func:`bare_trainer`, and a batch of random images
    (:func:`bench_batch`) on which its μ/σ were estimated. ``hidden``: the readout net's first hidden
    width (default: the paper's)."""
    module = ReadoutModule(
        classifier=name,
        weights=None,
        input_size=size,
        heatmap_every_n_steps=0,
        channels_last=channels_last,
        readout_hidden=hidden,
    )
    module.to(device)
    side = module.attributor.classifier.input_size
    images = torch.rand(batch_size, 3, side, side, device=device)
    module.attributor.estimate([images], progress=False)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    module.trainer = bare_trainer()  # type: ignore[assignment]
    return module, bench_batch(images)


def attached_copy(module: ReadoutModule) -> ReadoutModule:
    """A deep copy of ``module`` with a :func:`bare_trainer` of its own (a copy drops the Trainer)."""
    copy = deepcopy(module)
    copy.trainer = bare_trainer()  # type: ignore[assignment]
    return copy


def bare_trainer() -> SimpleNamespace:
    """What ``ReadoutModule.training_step`` and ``on_before_optimizer_step`` ask of a Trainer, outside
    its loop: step 0, one process (the finite-loss decision is not reduced over ranks), no loss scaler,
    and Lightning's barebones mode, in which ``self.log`` returns at once (with a warning, silenced
    by :func:`quiet_logging`)."""
    return SimpleNamespace(
        barebones=True,
        global_step=0,
        world_size=1,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
        precision_plugin=SimpleNamespace(scaler=None),
    )


@contextmanager
def quiet_logging() -> Iterator[None]:
    """Silences the warning that every ``self.log`` call of the module gives under :func:`bare_trainer`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
        yield


def bench_batch(images: torch.Tensor) -> dict[str, Any]:
    """A batch of the data layer's format (image, label, key) around ``images``; labels all 0."""
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    return {"image": images, "label": labels, "key": [f"bench-{i:06d}" for i in range(len(images))]}


def readout_training_step(module: ReadoutModule, batch: dict[str, Any]) -> Callable[[], None]:
    """One optimisation step of the product, as Lightning's automatic optimisation runs it:
    ``training_step`` (the shared first pass, the readout net, ``sample_noise``, CE + β/k·ΣKL and the
    finite-loss check), backward, ``on_before_optimizer_step`` (the finite-gradient check), then
    the step of the optimiser ``configure_optimizers`` gives. Lightning's loop and logging are left out."""
    configured = module.configure_optimizers()
    optimiser = configured["optimizer"] if isinstance(configured, dict) else configured
    module.trainer.optimizers = [optimiser]  # type: ignore[union-attr]  # training_step logs its lr

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        if loss is None:
            raise FloatingPointError("the readout's loss is not finite")
        loss.backward()
        module.on_before_optimizer_step(optimiser)
        optimiser.step()

    return step


def with_two_full_passes(module: ReadoutModule) -> ReadoutModule:
    """A copy of ``module`` whose first pass also runs the layers up to the bottleneck a second time, as
    the reference code does (it runs the whole classifier again with the bottleneck inserted)."""
    copy = attached_copy(module)
    attributor, first_pass = copy.attributor, copy.attributor.first_pass

    def two_passes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, _, readout = first_pass(images)
        with torch.no_grad():
            features = attributor.features(images)
        return logits, features, readout

    attributor.first_pass = two_passes  # type: ignore[method-assign]
    return copy


def with_compiled_suffix(module: ReadoutModule) -> ReadoutModule:
    """A copy of ``module`` whose layers after the bottleneck (the traced suffix of its split) are
    ``torch.compile``d."""
    copy = attached_copy(module)
    split = copy.attributor.split
    if split.suffix is None:
        raise ValueError("the classifier is not split at the bottleneck (hook path): nothing to compile")
    split.suffix = cast(torch.nn.Module, torch.compile(split.suffix))
    return copy


def under(
    precision: torch.dtype | None, device: torch.device, fn: Callable[[], object]
) -> Callable[[], None]:
    """``fn`` under autocast to ``precision`` (None: fp32), as Lightning's ``bf16-mixed`` runs a step."""

    def run() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            fn()

    return run


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def bench_readout(args: argparse.Namespace) -> list[dict]:
    """Readout training step and heatmaps against a plain training step and plain inference."""
    device = torch.device(args.device)
    results = []
    for name in args.classifiers:
        module, batch = readout_module(name, device, args.batch, channels_last=args.channels_last)
        images, attributor = batch["image"], module.attributor
        classifier, size = attributor.classifier, attributor.classifier.input_size
        variants = {
            "readout step (shared first pass)": module,
            "readout step (two full passes)": with_two_full_passes(module),
        }
        if args.compile:
            variants["readout step (compiled suffix)"] = with_compiled_suffix(module)
        narrow = {
            width: readout_module(name, device, args.batch, channels_last=args.channels_last, hidden=width)[0]
            for width in args.hidden
        }
        for width, other in narrow.items():
            variants[f"readout step (hidden {width})"] = other
        precisions = PRECISIONS if args.bf16 else {"fp32": None}
        title = f"readout, {name} at {size} px, batch {args.batch}"
        title += ", channels_last" if args.channels_last else ""
        with quiet_logging():
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
                    inference[f"readout heatmaps (hidden {width})"] = under(
                        dtype, device, partial(other.attributor, images)
                    )
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
                results.append(
                    report(f"{title}, {precision}: inference", infer, "plain inference", "images/s")
                )
            if args.bf16:
                step = {
                    p: under(d, device, readout_training_step(module, batch)) for p, d in PRECISIONS.items()
                }
                direct = compare(
                    {f"readout step, {p}": fn for p, fn in step.items()}, args.batch, args.repeats, device
                )
                results.append(
                    report(f"{title}: bf16 against fp32", direct, "readout step, fp32", "images/s")
                )
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

    The finite-loss decision is not reduced over the ranks here (:func:`bare_trainer` is one process):
    only the gradient all-reduce is added.
    """
    torch.manual_seed(0)  # the same classifier on every rank
    alone, batch = readout_module(args.classifier, device, args.batch)
    generator = torch.Generator().manual_seed(rank)  # each rank its own images, as under a sampler
    batch = bench_batch(torch.rand(batch["image"].shape, generator=generator).to(device))
    together = attached_copy(alone)
    # alpha() calls attributor.net: through the wrapper, DDP's forward arms the gradient all-reduce
    together.attributor.add_module("net", DistributedDataParallel(together.attributor.net))
    steps = {
        "1 process": readout_training_step(alone, batch),
        f"{args.processes} processes": readout_training_step(together, batch),
    }
    return steps, alone.attributor.classifier.input_size


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


def bench_loader_against_step(args: argparse.Namespace, loader: dict) -> dict:
    """The loader's images/s for each worker count (``loader``: :func:`bench_workers`' result) against
    the product's readout training step (:func:`readout_training_step`) of ``--classifier`` at the same
    image size and batch, on ``--device``. loader / step >= 1: the loader keeps the step fed."""
    device = torch.device(args.device)
    module, batch = readout_module(args.classifier, device, args.batch, args.size, args.channels_last)
    precision = "bf16" if args.bf16 else "fp32"
    step = "readout training step"
    with quiet_logging():
        rates = compare(
            {step: under(PRECISIONS[precision], device, readout_training_step(module, batch))},
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


def bench_relevance(args: argparse.Namespace) -> list[dict]:
    """Relevance-IBA's LRP pass in fp32 and under bf16 autocast: heatmaps/s and per-image conservation
    (the share of the injected relevance that reaches the input) on synthetic images."""
    from readout.data.synthetic import synthetic_batch
    from readout.export import load
    from readout.relevance import RelevanceIBA

    device = torch.device(args.device)
    attributor = load(args.bundle, device=str(device))
    relevance = RelevanceIBA(attributor)
    images = synthetic_batch(args.images, attributor.classifier.input_size, seed=9)["image"].to(device)
    base = attributor.explain(images)

    def propagate(bf16: bool) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return relevance.explain_from(images, base)

    rates = compare(
        {"fp32": partial(propagate, False), "bf16 autocast": partial(propagate, True)},
        len(images),
        args.repeats,
        device,
    )
    conservation = {
        name: [round(float(c), 4) for c in propagate(bf16).conservation.float()]
        for name, bf16 in [("fp32", False), ("bf16 autocast", True)]
    }
    for name, values in conservation.items():
        print(f"  conservation, {name}: min {min(values):.3f}, max {max(values):.3f}")
    return [
        report(
            f"relevance-iba LRP pass, {args.bundle}, {len(images)} images",
            rates,
            "fp32",
            "heatmaps/s",
            {"conservation": conservation},
        )
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m readout.bench`` (a test parses every command the docs give)."""
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
    per_sample.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        help="rows beyond fp32 eager (default: compiled, and the bf16 ones where the device has native "
        "bf16: emulated bf16 is many times slower than fp32; none: --variants with no value)",
    )
    per_sample.set_defaults(run=bench_per_sample)
    relevance = commands.add_parser("relevance", help=bench_relevance.__doc__)
    relevance.add_argument("--bundle", default=str(checkpoint_dir() / "readout-demo"))
    relevance.add_argument("--images", type=int, default=8)
    relevance.set_defaults(run=bench_relevance)
    readout = commands.add_parser("readout", help=bench_readout.__doc__)
    readout.add_argument("--classifiers", nargs="+", default=["synthetic-cnn", "resnet50"])
    readout.add_argument("--batch", type=int, default=16)
    readout.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    readout.add_argument("--compile", action="store_true", help="also time torch.compile of the suffix")
    readout.add_argument("--channels-last", action="store_true")
    readout.add_argument(
        "--hidden",
        nargs="*",
        type=int,
        default=[],
        help="also time readout nets of these first hidden widths",
    )
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
    data.add_argument(
        "--classifier", default="resnet50", help="whose readout training step the loader must feed"
    )
    data.add_argument("--bf16", action="store_true", help="time that step under bf16 autocast")
    data.add_argument("--channels-last", action="store_true", help="time that step in channels_last")
    data.set_defaults(run=bench_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    show_info()
    args = build_parser().parse_args(argv)
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
