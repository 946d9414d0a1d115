"""``python -m readout.explain``: heatmaps in bits for image files.

    python -m readout.explain --method per-sample --classifier synthetic-cnn --images 'imgs/*.png' --out out/
    python -m readout.explain --method readout --checkpoint checkpoints/readout-demo --images a.jpg --out out/
    python -m readout.explain --method relevance-per-sample --images a.jpg --out out/   (signed, pixel-sharp)
    python -m readout.explain --classifier resnet18 --weights-path my-resnet18.pth --classes 6 \
        --estimate-images 'train/**/*.jpg' --images a.jpg --out out/          (your own classifier)

For each image: ``<stem>.npy`` (float32 H×W, bits per pixel), ``<stem>.png`` (the image with the
heatmap over it and a colour bar), and one ``summary.json`` for the run (target, probability
before and after the bottleneck, total bits; the files that failed and why). A file that is not an
image is reported and the others are still done. The Per-Sample Bottleneck's μ/σ are estimated
once per classifier, layer and data source, and cached on disk (``--cache``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from readout.attributor import BottleneckAttributor
from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.evaluation.context import MethodContext
from readout.evaluation.methods import METHODS
from readout.images import BadImage, expand_images, load_image
from readout.logs import show_info
from readout.lrp import CANONIZERS, COMPOSITES
from readout.per_sample import PerSample
from readout.plotting import save_heatmap_png
from readout.precision import PRECISIONS, resolve_precision
from readout.relevance import INJECTIONS, RelevanceIBA
from readout.statistics_cache import (
    DEFAULT_CACHE,
    MissingStatisticsData,
)


def classifier_of(args: argparse.Namespace) -> Classifier:
    """The classifier the arguments name (see :func:`readout.backbones.load_classifier`)."""
    normalisation = None
    if args.mean or args.std:
        if not (args.mean and args.std):
            raise SystemExit("error: --mean and --std go together (three values each)")
        normalisation = {"mean": args.mean, "std": args.std}
    classes: int | list[str] | None = None
    if args.classes:
        classes = int(args.classes) if args.classes.isdigit() else args.classes.split(",")
    return load_classifier(
        args.classifier,
        weights=None if args.weights == "none" else args.weights,
        weights_path=args.weights_path,
        input_size=args.input_size,
        normalisation=normalisation,
        classes=classes,
        allow_import=args.allow_import,
    )


def build_attributor(args: argparse.Namespace) -> BottleneckAttributor | RelevanceIBA:
    """The ``--method``'s attributor from the evaluation's method registry
    (:data:`readout.evaluation.methods.METHODS`), with the options its flags give.

    Readout methods run on the classifier the bundle names; the others on ``--classifier``, whose
    μ/σ come from the statistics cache (:mod:`readout.statistics_cache`) or are estimated into it.
    """
    entry = METHODS[args.method]
    assert entry.attributor is not None
    context = MethodContext(
        statistics_shards=args.estimate_shards,
        statistics_samples=args.estimate_samples,
        statistics_cache=args.cache,
        statistics_images=list(args.estimate_images or []) or None,
        share=False,
        device=args.device,
        allow_import=args.allow_import,
    )
    flags = {**vars(args), "bundle": args.checkpoint}
    options = {o.name: flags[o.name] for o in entry.options if flags.get(o.name) is not None}
    if entry.bundle_option:
        if not args.checkpoint:
            raise SystemExit(
                f"error: --method {args.method} needs --checkpoint DIR (a bundle written by readout.fit)"
            )
        return entry.attributor(None, context, **options)
    # On the device before estimating: μ/σ over thousands of images should not run on the CPU.
    classifier = classifier_of(args).to(args.device)
    try:
        return entry.attributor(classifier, context, **options)
    except MissingStatisticsData as error:
        raise SystemExit(f"error: {error}") from None


def resolved_relevance_options(attributor: RelevanceIBA) -> dict[str, Any]:
    """What a Relevance-IBA attributor runs with, defaults resolved: recorded in summary.json."""
    return {
        "composite": attributor.propagator.composite_name,
        "canonizer": attributor.propagator.canonizer_name,
        "injection": attributor.injection,
        "mask_dead": attributor.mask_dead,
    }


#: The methods explain runs: those of the registry with an attributor object.
EXPLAINED = sorted(name for name, entry in METHODS.items() if entry.attributor is not None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m readout.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=EXPLAINED, default="per-sample")
    parser.add_argument(
        "--classifier",
        default="synthetic-cnn",
        help="synthetic-cnn, a torchvision model name, package.module:callable, or a saved classifier path",
    )
    parser.add_argument(
        "--weights", default="IMAGENET1K_V1", help="torchvision weights entry ('none': random init)"
    )
    parser.add_argument("--weights-path", help="a local weights file (safetensors or state dict)")
    parser.add_argument("--input-size", type=int, help="the classifier's input side (default: its name's)")
    parser.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: its name's)")
    parser.add_argument("--std", type=float, nargs=3, help="normalisation std (default: its name's)")
    parser.add_argument("--classes", help="the number of classes, or their names separated by commas")
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="rebuild a classifier that a saved file or bundle names by import path (runs that code)",
    )
    parser.add_argument("--checkpoint", help="readout bundle directory or URL (readout methods)")
    parser.add_argument("--images", nargs="+", required=True, help="image files or globs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--target", type=int, help="class to explain (default: the classifier's top-1)")
    parser.add_argument("--layer", help="bottleneck layer (default: the registry's per-sample layer)")
    parser.add_argument("--beta", type=float, default=10.0, help="β·k (paper: 10)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="per-sample: the layers after the bottleneck in bf16 autocast or fp32 (auto: bf16 where native)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="per-sample: torch.compile the layers after the bottleneck"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimate-shards", help="shards whose images give μ/σ (per-sample)")
    parser.add_argument(
        "--estimate-images", nargs="+", help="image files or globs whose images give μ/σ (per-sample)"
    )
    parser.add_argument("--estimate-samples", type=int, default=2000)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where estimated μ/σ are kept")
    parser.add_argument(
        "--composite",
        choices=sorted(COMPOSITES),
        help="zennit composite (relevance methods; default per classifier)",
    )
    parser.add_argument(
        "--canonizer",
        choices=sorted(CANONIZERS),
        help="zennit canonizer (relevance methods; default per classifier)",
    )
    parser.add_argument(
        "--injection",
        choices=sorted(INJECTIONS),
        default="information",
        help="relevance put at the bottleneck (relevance methods): the information per element, or λ·R",
    )
    parser.add_argument(
        "--mask-dead",
        action="store_true",
        help="inject no relevance on units the ReLU zeroes (relevance methods)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def unique_stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for file in files:
        count = seen.get(file.stem, 0)
        seen[file.stem] = count + 1
        stems.append(file.stem if count == 0 else f"{file.stem}-{count}")
    return stems


def write_outputs(
    out: Path,
    stem: str,
    image: torch.Tensor,
    explanation: Any,
    index: int,
    signed: bool,
    classes: list[str],
) -> dict[str, Any]:
    """Writes ``<stem>.npy`` and ``<stem>.png`` for image ``index`` of an explanation; returns its record."""
    heatmap = explanation.heatmap[index].float().cpu()
    np.save(out / f"{stem}.npy", heatmap.numpy().astype(np.float32))
    target = int(explanation.target[index])
    total = float(explanation.total_bits[index])
    label = classes[target] if target < len(classes) else target
    # What the picture holds: the map's own sum (a relevance map may lose or gain some of the bits).
    title = f"{stem}: class {label}, map sums to {float(heatmap.sum()):.1f} bits"
    if signed:
        title += f" ({total:.1f} passed the bottleneck)"
    save_heatmap_png(out / f"{stem}.png", image, heatmap, title, symmetric=signed)
    record = {
        "target": target,
        "label": classes[target] if target < len(classes) else str(target),
        "probability": float(explanation.probability[index]),
        "probability_bottleneck": float(explanation.probability_bottleneck[index]),
        "total_bits": total,
    }
    if hasattr(explanation, "conservation"):  # relevance methods: input relevance / injected bits
        record["conservation"] = float(explanation.conservation[index])
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = expand_images(args.images)
    attributor = build_attributor(args).to(args.device)
    fitted = attributor.base if isinstance(attributor, RelevanceIBA) else attributor  # the bottleneck's own
    classifier = fitted.classifier
    size = classifier.input_size
    summary: dict[str, Any] = {"method": args.method, "images": {}, "failed": {}}
    if isinstance(attributor, RelevanceIBA):
        summary["relevance"] = resolved_relevance_options(attributor)
    if isinstance(fitted, PerSample):  # the precision its fits ran in ("auto" resolved for this device)
        summary["precision"] = resolve_precision(fitted.precision, torch.device(args.device))
    stems = unique_stems(files)
    for start in tqdm(range(0, len(files), args.batch_size), desc="explaining", unit="batch"):
        batch_files, batch_stems, images = [], [], []
        chunk = slice(start, start + args.batch_size)
        for file, stem in zip(files[chunk], stems[chunk], strict=True):
            try:
                images.append(load_image(file, size))
            except BadImage as error:
                print(f"skipped: {error}", file=sys.stderr)
                summary["failed"][str(file)] = str(error)
                continue
            batch_files.append(file)
            batch_stems.append(stem)
        if not images:
            continue
        batch = torch.stack(images).to(args.device)
        explanation = attributor.explain(batch, args.target)
        for i, (file, stem) in enumerate(zip(batch_files, batch_stems, strict=True)):
            record = write_outputs(
                out,
                stem,
                images[i],
                explanation,
                i,
                METHODS[args.method].signed,
                classifier.classes,
            )
            summary["images"][stem] = {"file": str(file), **record}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    show_info()
    summary = run(parse_args(argv))
    done, failed = len(summary["images"]), len(summary["failed"])
    print(f"{done} heatmaps written, {failed} files skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
