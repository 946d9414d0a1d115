"""The outputs of an evaluation: ``results.md`` (the paper's Table 2 layout), ``results.json`` and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from readout.atomic import atomic_write
from readout.evaluation.config import EvalConfig
from readout.evaluation.results import PAIRED_LOCALISATION
from readout.evaluation.runner import Evaluation
from readout.evaluation.states import RowMetrics
from readout.metrics import num_tiles


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _with_error(value: Any, error: Any) -> str:
    """``0.818 ± 0.012``, or the value alone where the error is undefined."""
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return _fmt(value)
    return f"{_fmt(value)} ± {_fmt(error)}"


def markdown_table(config: EvalConfig, rows: dict[str, Any], size: tuple[int, int]) -> str:
    """The paper's Table 2 layout: one row per method; degradation per tile size, boxes, masks."""
    tiles = config.degradation.tiles
    header = ["Method", *[f"deg. {t}x{t} px" for t in tiles], "bbox", "mask top-n", "mask mass", "boundary"]
    header += ["Sens.-n (mean r)", "SSIM rand. (last)", "s / img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in rows.items():
        loc = result["localisation"]
        cells = [name]
        cells += [
            _with_error(result[f"degradation-{t}"]["score"], result[f"degradation-{t}"]["score_se"])
            for t in tiles
        ]
        cells += [
            _with_error(loc["box_ratio"], loc["box_ratio_se"]),
            _fmt(loc["mask_ratio"]),
            _fmt(loc["mask_mass"]),
        ]
        cells += [_fmt(loc["boundary_sharpness"])]
        sens = result.get("sensitivity")
        correlations = [c for c in (sens or {}).get("correlation", []) if not math.isnan(c)]
        cells.append(_fmt(sum(correlations) / len(correlations)) if correlations else "–")
        rand = result.get("randomisation")
        cells.append(_fmt(rand["ssim"][-1]) if rand else "–")
        cells.append(_fmt(result["seconds_per_image"], 4))
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    counts = [f"{first[f'degradation-{t}']['count']:.0f}" for t in tiles]
    sens_n = int(max((first.get("sensitivity") or {}).get("count", [0]) or [0]))
    rand_n = max(
        (int(max(r["randomisation"]["count"])) for r in rows.values() if r.get("randomisation")), default=0
    )
    height, width = size
    notes = [
        "",
        f"Images: {first['images']} ({height}x{width} px); target: {config.target}. ± is the standard "
        "error over images (for degradation with t1 and b fixed). "
        f"Degradation (area between scaled LeRF and MoRF, eq. 8): tiles of {', '.join(map(str, tiles))} px "
        f"({', '.join(str(num_tiles(height, width, t)) for t in tiles)} tiles), "
        f"baseline {config.degradation.baseline}, on {', '.join(counts)} images. "
        f"bbox: top-n ratio on the {first['localisation']['box_ratio_count']:.0f} images whose box covers "
        f"< {config.localisation.max_box_coverage:.0%}; mask top-n / mass / boundary sharpness "
        f"({config.localisation.boundary_width} px bands) on {first['localisation']['mask_ratio_count']:.0f} "
        "images with masks.",
        f"Sensitivity-n: mean Pearson r over n, {config.sensitivity.tile} px tiles, "
        f"{config.sensitivity.num_masks} masks per n, baseline {config.sensitivity.baseline}, "
        f"{sens_n} images. Randomisation: SSIM of the map after "
        f"re-initialising every layer to the original, {rand_n} images. s / img: attribution time only.",
    ]
    return "\n".join(lines + notes + paired_table(config, rows)) + "\n"


def _signed(part: dict[str, float]) -> str:
    """``+0.012 ± 0.004``: a paired difference and its standard error."""
    mean, error = part["mean"], part["se"]
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:+.3f}" + ("" if error is None or math.isnan(error) else f" ± {error:.3f}")


def paired_table(config: EvalConfig, rows: dict[str, Any]) -> list[str]:
    """The lines of the paired-differences table (every row against the reference), or none."""
    reference = config.reference or config.methods[0].name
    others = {name: r["paired"] for name, r in rows.items() if name != reference and "paired" in r}
    if not others:
        return []
    tiles = config.degradation.tiles
    header = ["Method", *[f"deg. {t}x{t} px" for t in tiles], "bbox", "mask top-n", "mask mass", "boundary"]
    lines = [
        "",
        f"Paired differences to **{reference}**: the mean ± standard error of the per-image "
        "differences (this row minus the reference) on the images both scored; a difference is "
        "resolved where it exceeds about twice its error.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, paired in others.items():
        cells = [name, *[_signed(paired[f"degradation-{t}"]) for t in tiles]]
        cells += [_signed(paired[score]) for score in PAIRED_LOCALISATION]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    atomic_write(str(path), (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())


def save_plots(
    out: Path,
    config: EvalConfig,
    rows: dict[str, Any],
    evaluation: Evaluation,
    totals: dict[str, RowMetrics],
) -> list[str]:
    """Writes the PNGs; returns their names."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from readout.plotting import overlay

    colours = colormaps["tab20"]
    written = []
    tiles = config.degradation.tiles
    figure = Figure(figsize=(6 * len(tiles), 4.5))
    axes = figure.subplots(1, len(tiles), squeeze=False)
    for axis, tile in zip(axes[0], tiles, strict=True):
        for i, (name, result) in enumerate(rows.items()):
            curves = result[f"degradation-{tile}"]
            axis.plot(curves["fraction"], curves["morf"], color=colours(i % 20), label=name)
            axis.plot(curves["fraction"], curves["lerf"], color=colours(i % 20), linestyle="--")
        axis.set(
            title=f"degradation, {tile} px tiles (solid MoRF, dashed LeRF)",
            xlabel="fraction of tiles removed",
        )
        axis.set_ylabel("scaled target probability (eq. 8)")
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(out / "degradation.png", dpi=110)
    written.append("degradation.png")

    if config.sensitivity.fraction > 0:
        figure = Figure(figsize=(8, 4.5))
        axis = figure.subplots()
        for i, (name, result) in enumerate(rows.items()):
            sens = result["sensitivity"]
            pixels = [n * config.sensitivity.tile**2 for n in sens["n"]]
            axis.plot(pixels, sens["correlation"], marker=".", color=colours(i % 20), label=name)
        axis.set(
            xscale="log", xlabel="pixels removed (n tiles x tile area)", ylabel="Sensitivity-n (Pearson r)"
        )
        axis.set_title(f"Sensitivity-n, {config.sensitivity.tile} px tiles")
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        figure.savefig(out / "sensitivity-n.png", dpi=110)
        written.append("sensitivity-n.png")

    if evaluation.labels is not None and any(r.get("randomisation") for r in rows.values()):
        figure = Figure(figsize=(8, 4.5))
        axis = figure.subplots()
        for i, (name, result) in enumerate(rows.items()):
            if result.get("randomisation"):
                axis.plot(
                    evaluation.labels,
                    result["randomisation"]["ssim"],
                    marker=".",
                    color=colours(i % 20),
                    label=name,
                )
        axis.set(xlabel="re-initialised down to", ylabel="SSIM to the original map", ylim=(-0.1, 1.05))
        axis.set_title("cascading weight randomisation")
        axis.tick_params(axis="x", rotation=45)
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
        figure.savefig(out / "randomisation.png", dpi=110)
        written.append("randomisation.png")

    images, keys = evaluation.example_images()
    shown = [(name, maps) for name in rows if (maps := totals[name].examples) is not None]
    if len(images) and shown:
        count = min(len(images), *(len(maps) for _, maps in shown))
        figure = Figure(figsize=(1.6 * count + 1.5, 1.6 * (len(shown) + 1)))
        axes = figure.subplots(len(shown) + 1, count, squeeze=False)
        for j in range(count):
            axes[0, j].imshow(images[j].permute(1, 2, 0).numpy())
            axes[0, j].set_title(keys[j], fontsize=5)
        for i, (name, maps) in enumerate(shown, start=1):
            signed = rows[name]["signed"]
            for j in range(count):
                axes[i, j].imshow(overlay(images[j], maps[j], symmetric=signed).permute(1, 2, 0).numpy())
            axes[i, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        figure.savefig(out / "heatmaps.png", dpi=110)
        written.append("heatmaps.png")
    return written
