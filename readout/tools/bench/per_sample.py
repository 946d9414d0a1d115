"""``readout.bench per-sample`` and ``relevance``: the Per-Sample Bottleneck's variants against the
straightforward implementation, and Relevance-IBA's LRP pass in fp32 against bf16."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from readout.backbones import load_classifier
from readout.per_sample import PerSample
from readout.precision import native_bf16
from readout.tools.bench.timing import compare, report
from readout.tools.reference import straightforward_heatmaps

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


def bench_relevance(args: argparse.Namespace) -> list[dict]:
    """Relevance-IBA's LRP pass in fp32 and under bf16 autocast: heatmaps/s and per-image conservation
    (the share of the injected relevance that reaches the input) on synthetic images."""
    from readout.bundle import load
    from readout.data.synthetic import synthetic_batch
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
