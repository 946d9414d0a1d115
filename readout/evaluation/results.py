"""Scores from the summed metric states: per row, and paired differences to a reference row."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from readout.evaluation.methods import options_of
from readout.evaluation.runner import Evaluation
from readout.evaluation.states import PER_IMAGE, RowMetrics
from readout.metrics import LOCALISATION_SCORES, results_dict
from readout.metrics.paired import paired_differences


def compute_results(evaluation: Evaluation, totals: dict[str, RowMetrics]) -> dict[str, Any]:
    """Scores per row; reduces the states over ranks first when a process group runs (collective)."""
    rows: dict[str, Any] = {}
    for row in evaluation.rows:
        state = totals[row.spec.name]
        with warnings.catch_warnings():
            # states merged from cache files count no update() calls: not a mistake here
            warnings.filterwarnings(
                "ignore", message=".*compute.*called before.*update", category=UserWarning
            )
            values = results_dict(
                {name: metric for name, metric in state.metrics.items() if not name.startswith(PER_IMAGE)}
            )
        seconds = torch.tensor(
            [state.seconds, state.metric_seconds, float(state.images)],
            dtype=torch.float64,
            device=evaluation.device,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(seconds)
        total_seconds, metric_seconds, images = seconds.tolist()
        rows[row.spec.name] = {
            "method": row.spec.method,
            "options": dict(options_of(row.spec)),
            "signed": row.signed,
            "seconds_per_image": total_seconds / images if images else float("nan"),
            "metric_seconds": metric_seconds,
            "images": int(images),
            **values,
        }
    add_paired_differences(evaluation, totals, rows)
    return rows


#: The scores compared image by image: the per-image column of each, and the result it refines.
PAIRED_LOCALISATION = ("box_ratio", "mask_ratio", "mask_mass", "boundary_sharpness")


def add_paired_differences(
    evaluation: Evaluation, totals: dict[str, RowMetrics], rows: dict[str, Any]
) -> None:
    """Adds ``paired`` to every row but the reference: per score, the mean ± standard error of the
    per-image differences to the reference row on the images both scored (collective where
    distributed). Degradation differences are in units of the score (divided by the reference's
    t1 − b, the same for every row on the same images)."""
    config = evaluation.config
    reference = config.reference or config.methods[0].name
    per_image = {
        name: {
            key[len(PER_IMAGE) :]: metric.compute()
            for key, metric in state.metrics.items()
            if key.startswith(PER_IMAGE)
        }
        for name, state in totals.items()
    }
    columns = {name: LOCALISATION_SCORES.index(name) for name in PAIRED_LOCALISATION}
    for name, result in rows.items():
        if name == reference:
            result["paired"] = {"reference": reference}
            continue
        paired: dict[str, Any] = {"reference": reference}
        local = paired_differences(per_image[name]["localisation"], per_image[reference]["localisation"])
        for score, column in columns.items():
            paired[score] = {part: float(local[part][column]) for part in ("mean", "se", "count")}
        for tile in config.degradation.tiles:
            group = f"degradation-{tile}"
            scale = rows[reference][group]["t1"] - rows[reference][group]["b"]
            areas = paired_differences(per_image[name][group], per_image[reference][group])
            paired[group] = {
                "mean": float(areas["mean"][0]) / scale,
                "se": abs(float(areas["se"][0]) / scale),
                "count": float(areas["count"][0]),
            }
        result["paired"] = paired
