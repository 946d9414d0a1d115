"""``python -m readout.tools.compare_relevance``: Relevance-IBA against the upsampled IBA maps it starts from.

On held-out synthetic images (seed :data:`EVAL_SEED`, never used for training or for the bottleneck's
statistics, which use :data:`STATS_SEED`), for each setting (classifier, bottleneck layer, image size):

- the Per-Sample Bottleneck's map, upsampled to the image (IBA), with the paper's defaults;
- Relevance-IBA from the same fit, with the ablations of :data:`VARIANTS` (composite, dead-unit
  masking, injection);
- with ``--readout DIR``: the Readout Bottleneck's map and Relevance-IBA from it, on the setting whose
  classifier the bundle was trained on.

Scores (:mod:`readout.metrics.localisation`), means over the images: box ratio, mask top-n share,
positive mass inside the mask, boundary sharpness (mass just inside the contour / mass in both bands)
and boundary share. The Δ columns are paired differences (mask top-n share, mass in mask) to the
upsampled map of the same fit, ± their standard error over images. Writes ``results.md``,
``results.json`` and ``figure-<setting>.png`` (image | upsampled IBA | Relevance-IBA) to ``--out``.

Settings: ``64px-block1`` (the shipped classifier at its default layer, stride 2: the IBA map is
upsampled 2x), ``64px-block3`` (stride 8: upsampled 8x, as the paper's conv3_4 at 224 px) and, given a
224-px synthetic-cnn (``--hires-classifier PATH``), ``224px-block3``. Nothing is tuned on the held-out
images: every option is fixed before they are seen.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from readout.attributor import BottleneckAttributor, Explanation
from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.data.synthetic import synthetic_batch
from readout.logs import show_info
from readout.metrics.localisation import LOCALISATION_SCORES, localisation_scores
from readout.metrics.paired import difference_statistics
from readout.per_sample import PerSample
from readout.plotting import overlay
from readout.relevance import Injection, RelevanceIBA

#: Held-out images and the bottleneck's statistics: seeds of their own (0 trains the shipped classifier,
#: 1000 tests it, 777 gives the explain CLI's statistics).
EVAL_SEED, STATS_SEED = 4242, 4243


@dataclass(frozen=True)
class Variant:
    """One Relevance-IBA configuration (None composite: the classifier's default, EpsilonPlusFlat)."""

    name: str
    composite: str | None = None
    injection: Injection = "information"
    mask_dead: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("EpsilonPlusFlat"),
    Variant("EpsilonPlusFlat, mask_dead", mask_dead=True),
    Variant("EpsilonPlusFlat, lambda-activation", injection="lambda-activation"),
    Variant("EpsilonPlusFlatSumPlus", composite="EpsilonPlusFlatSumPlus"),
    Variant("EpsilonPlusFlatSumPlus, mask_dead", composite="EpsilonPlusFlatSumPlus", mask_dead=True),
    Variant("EpsilonPlusFlatZPlusFallback", composite="EpsilonPlusFlatZPlusFallback"),
    Variant("EpsilonGammaBox", composite="EpsilonGammaBox"),
    Variant("EpsilonAlpha2Beta1Flat", composite="EpsilonAlpha2Beta1Flat"),
    Variant("EpsilonAlpha2Beta1", composite="EpsilonAlpha2Beta1"),
)


@dataclass
class Setting:
    name: str
    classifier: Classifier
    layer: str
    size: int


@dataclass
class Row:
    """Per-image scores of one method in one setting, and what it cost."""

    method: str
    scores: dict[str, list[float]] = field(default_factory=dict)
    conservation: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, heatmap: torch.Tensor, batch: dict[str, Any], boundary_width: int) -> None:
        values = localisation_scores(
            heatmap.float(),
            batch["box_mask"],
            batch["mask"],
            batch["has_mask"],
            boundary_width=boundary_width,
        )
        for name in LOCALISATION_SCORES:
            self.scores.setdefault(name, []).extend(values[name].tolist())


def nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over images where both are defined, and its standard error (NaN below two)
    (:func:`readout.metrics.paired.difference_statistics`, as the evaluation's paired columns)."""
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    statistics = difference_statistics(differences[:, None])
    if statistics["count"][0] < 2:
        return float("nan"), float("nan")
    return float(statistics["mean"][0]), float(statistics["se"][0])


# ---------------------------------------------------------------------------------------------------------
# One setting


def held_out(setting: Setting, n: int, batch_size: int) -> list[dict[str, Any]]:
    return [
        synthetic_batch(min(batch_size, n - start), setting.size, EVAL_SEED, start)
        for start in range(0, n, batch_size)
    ]


def statistics_batches(size: int, n: int, batch_size: int = 64):
    for start in range(0, n, batch_size):
        yield synthetic_batch(min(batch_size, n - start), size, STATS_SEED, start)["image"]


def evaluate_base(
    base: BottleneckAttributor,
    label: str,
    batches: list[dict[str, Any]],
    variants: tuple[Variant, ...],
    boundary_width: int,
) -> tuple[list[Row], Explanation, dict[str, torch.Tensor]]:
    """Rows for the base's upsampled map and for Relevance-IBA from it, one fit per batch.

    Also returns the first batch's base explanation and each variant's heatmaps of it, for the figure.
    """
    rows = [Row(f"{label} (upsampled)")] + [Row(f"Relevance-{label}: {v.name}") for v in variants]
    attributors = [
        RelevanceIBA(base, composite=v.composite, injection=v.injection, mask_dead=v.mask_dead)
        for v in variants
    ]
    first: dict[str, torch.Tensor] = {}
    for batch in batches:
        images = batch["image"]
        start = time.perf_counter()
        explanation = base.explain(images, batch["label"])
        rows[0].seconds += time.perf_counter() - start
        rows[0].add(explanation.heatmap, batch, boundary_width)
        for row, attributor in zip(rows[1:], attributors, strict=True):
            start = time.perf_counter()
            relevance = attributor.explain_from(images, explanation)
            row.seconds += time.perf_counter() - start
            row.add(relevance.heatmap, batch, boundary_width)
            row.conservation.extend(relevance.conservation.tolist())
            if batch is batches[0]:
                first[row.method.split(": ", 1)[1]] = relevance.heatmap
        if batch is batches[0]:
            first_explanation = explanation
    return rows, first_explanation, first


def accuracy(classifier: Classifier, batches: list[dict[str, Any]]) -> float:
    with torch.no_grad():
        hits = sum(int((classifier(b["image"]).argmax(1) == b["label"]).sum()) for b in batches)
    return hits / sum(len(b["label"]) for b in batches)


def load_readout(path: str, classifier: Classifier) -> BottleneckAttributor | None:
    from readout.bundle import load

    try:
        return load(path, classifier=classifier)
    except ValueError as error:
        print(f"note: readout bundle {path} does not fit this setting's classifier, skipped: {error}")
        return None


def bundle_fits(path: str, setting: Setting) -> bool:
    """Whether a readout bundle was trained on this setting's classifier (same weights, same input size)."""
    from readout.bundle import classifier_fingerprint, read_config

    meta = read_config(path)["classifier"]
    return bool(
        meta["fingerprint"] == classifier_fingerprint(setting.classifier)
        and meta["input_size"] == setting.size
    )


def readouts_of(setting: Setting, paths: list[str], settings: list[Setting]) -> list[str]:
    """The bundles whose rows go to ``setting``: each bundle once, in the setting of its own classifier
    and bottleneck layer or, where no setting has that layer, the first setting of its classifier."""
    from readout.bundle import read_config

    chosen = []
    for path in paths:
        fitting = [s for s in settings if bundle_fits(path, s)]
        if not fitting:
            print(f"note: readout bundle {path} fits no setting's classifier, skipped")
            continue
        layer = read_config(path)["layer"]
        home = next((s for s in fitting if s.layer == layer), fitting[0])
        if home is setting:
            chosen.append(path)
    return chosen


def run_setting(setting: Setting, args: argparse.Namespace, all_settings: list[Setting]) -> dict[str, Any]:
    batches = held_out(setting, args.n, args.batch_size)
    width = max(1, round(2 * setting.size / 64))
    base = PerSample(setting.classifier, layer=setting.layer, seed=0)
    base.estimate(statistics_batches(setting.size, args.stats_samples), progress=False)
    variants = tuple(v for v in VARIANTS if args.variants is None or v.name in args.variants)
    rows, explanation, heatmaps = evaluate_base(base, "IBA", batches, variants, width)
    readout_groups: list[list[Row]] = []  # per bundle: its upsampled map, then Relevance-Readout
    for bundle in readouts_of(setting, args.readout, all_settings):
        readout = load_readout(bundle, setting.classifier)
        if readout is not None:
            readout_groups.append(evaluate_base(readout, "Readout", batches, variants[:1], width)[0])
    shown = {name: heatmaps[name] for name in args.figure_variants if name in heatmaps}
    path = Path(args.out) / f"figure-{setting.name}.png"
    figure(setting, batches[0], explanation, shown, path, args.figure_images)
    n_images = sum(len(b["label"]) for b in batches)
    return {
        "setting": setting.name,
        "layer": setting.layer,
        "size": setting.size,
        "stride": setting.size // base.shape[1],
        "images": n_images,
        "accuracy": accuracy(setting.classifier, batches),
        "boundary_width": width,
        "rows": [summary(row, group[0], n_images) for group in [rows, *readout_groups] for row in group],
    }


#: Scores also reported as paired differences to the base's upsampled map of the same fit.
PAIRED = ("mask_ratio", "mask_mass")


def summary(row: Row, reference: Row, n_images: int) -> dict[str, Any]:
    deltas = {name: paired_difference(row.scores[name], reference.scores[name]) for name in PAIRED}
    return {
        "method": row.method,
        **{name: nanmean(row.scores[name]) for name in LOCALISATION_SCORES},
        **{f"delta_{name}": delta for name, (delta, _) in deltas.items()},
        **{f"delta_{name}_se": error for name, (_, error) in deltas.items()},
        "conservation": nanmean(row.conservation) if row.conservation else None,
        "conservation_range": [min(row.conservation), max(row.conservation)] if row.conservation else None,
        "seconds_per_image": row.seconds / n_images,
    }


# ---------------------------------------------------------------------------------------------------------
# Output


def clipped(heatmap: torch.Tensor, quantile: float = 0.995) -> torch.Tensor:
    """The map clamped to ± its ``quantile`` of |values|: a few large pixels would wash out the colours."""
    bound = heatmap.abs().flatten().float().quantile(quantile)
    return heatmap.clamp(-bound, bound)


def figure(
    setting: Setting,
    batch: dict[str, Any],
    explanation: Explanation,
    relevance: dict[str, torch.Tensor],
    path: Path,
    count: int,
) -> None:
    """image | upsampled IBA | Relevance-IBA per variant (signed: blue < 0 < red), ``count`` images."""
    count = min(count, len(explanation.heatmap))
    columns = 2 + len(relevance)
    fig = Figure(figsize=(2.2 * columns, 2.2 * count))
    axes = fig.subplots(count, columns, squeeze=False)
    for i in range(count):
        image = batch["image"][i]
        panels = [(image, "image"), (overlay(image, explanation.heatmap[i]), "IBA (upsampled)")]
        panels += [
            (overlay(image, clipped(maps[i]), symmetric=True), f"Relevance-IBA\n{name}")
            for name, maps in relevance.items()
        ]
        for ax, (picture, title) in zip(axes[i], panels, strict=True):
            ax.imshow(picture.permute(1, 2, 0).numpy())
            ax.contour(batch["mask"][i].float().numpy(), levels=[0.5], colors="lime", linewidths=0.6)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"{setting.name} (layer {setting.layer}); green: object mask; relevance clipped at its 99.5th "
        "percentile of |R|",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COLUMNS = [
    ("box_ratio", "box ratio"),
    ("mask_ratio", "mask top-n"),
    ("mask_mass", "mass in mask"),
    ("boundary_sharpness", "boundary sharpness"),
    ("boundary_share", "boundary share"),
]


def markdown(results: list[dict[str, Any]], command: str, seconds: float) -> str:
    lines = [
        "# Relevance-IBA vs upsampled IBA on held-out synthetic images",
        "",
        f"Command: `{command}` ({seconds:.0f} s). Held-out seed {EVAL_SEED}, statistics seed {STATS_SEED}.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result['setting']}: layer {result['layer']} (stride {result['stride']}), "
            f"{result['size']} px, {result['images']} images, classifier accuracy {result['accuracy']:.3f}",
            "",
        ]
        header = [
            "method",
            *(title for _, title in COLUMNS),
            "Δ mask top-n (± s.e.)",
            "Δ mass in mask (± s.e.)",
            "conservation (min–max per image)",
            "s/img",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in result["rows"]:
            cells = [row["method"], *(f"{row[key]:.3f}" for key, _ in COLUMNS)]
            for name in PAIRED:
                delta, error = row[f"delta_{name}"], row[f"delta_{name}_se"]
                cells.append("" if row["conservation"] is None else f"{delta:+.3f} ± {error:.3f}")
            if row["conservation"] is None:
                cells.append("")
            else:
                low, high = row["conservation_range"]
                cells.append(f"{row['conservation']:.4f} ({low:.4f}–{high:.4f})")
            cells.append(f"{row['seconds_per_image']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command


def settings(args: argparse.Namespace) -> list[Setting]:
    if args.random_init:
        small = load_classifier("synthetic-cnn", weights=None)
    else:
        small = load_classifier(args.classifier)
    chosen = [
        Setting("64px-block1", small, "block1", small.input_size),
        Setting("64px-block3", small, "block3", small.input_size),
    ]
    if not args.hires_classifier:
        print(
            "note: no 224-px classifier given (--hires-classifier PATH, e.g. from python -m "
            "readout.tools.train_classifier --size 224): the 224px setting is skipped"
        )
        return chosen
    hires = load_classifier(args.hires_classifier)
    chosen.append(Setting("224px-block3", hires, "block3", hires.input_size))
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m readout.tools.compare_relevance", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="results/compare-relevance", help="output directory")
    parser.add_argument("--n", type=int, default=64, help="held-out images per setting")
    parser.add_argument("--batch-size", type=int, default=16, help="images fitted together")
    parser.add_argument("--stats-samples", type=int, default=512, help="images for the bottleneck's μ, σ")
    parser.add_argument("--classifier", default="synthetic-cnn", help="64-px classifier: name or saved path")
    parser.add_argument("--random-init", action="store_true", help="random 64-px classifier (smoke tests)")
    parser.add_argument("--hires-classifier", default=None, help="a saved synthetic-cnn trained at 224 px")
    parser.add_argument(
        "--readout",
        nargs="*",
        default=[],
        help="readout bundles; each is compared in the setting of its classifier (and layer, if one has it)",
    )
    parser.add_argument("--figure-images", type=int, default=4)
    parser.add_argument(
        "--figure-variants",
        nargs="*",
        default=["EpsilonPlusFlat", "EpsilonPlusFlatSumPlus, mask_dead"],
        help="Relevance-IBA variants drawn in the figure (those that ran)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        choices=[v.name for v in VARIANTS],
        help="Relevance-IBA variants to run (default: all)",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    show_info()
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.readout:
        print("note: no --readout bundle given: the Readout rows are skipped")
    results = []
    chosen = settings(args)
    for setting in chosen:
        if args.only and setting.name not in args.only:
            continue
        print(f"{setting.name}: layer {setting.layer}, {setting.size} px, {args.n} images")
        results.append(run_setting(setting, args, chosen))
    seconds = time.perf_counter() - started
    command = "python -m readout.tools.compare_relevance " + " ".join(argv if argv is not None else _argv())
    (out / "results.md").write_text(markdown(results, command.strip(), seconds))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(markdown(results, command.strip(), seconds))
    return results


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
