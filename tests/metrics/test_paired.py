"""Paired differences between rows against the slow, obvious loop over images."""

from __future__ import annotations

import math

import pytest
import torch

from readout.metrics.paired import ImageScores, key_hashes, paired_differences


def test_key_hashes_are_stable_and_distinct() -> None:
    keys = [f"synthetic-{i:06d}" for i in range(1000)]
    hashes = key_hashes(keys)
    assert hashes.dtype == torch.int64 and len(set(hashes.tolist())) == 1000
    assert torch.equal(hashes, key_hashes(keys))
    assert int(key_hashes(["a"])[0]) == int(key_hashes(["b", "a"])[1])


def slow_paired(row: dict[str, float], reference: dict[str, float]) -> tuple[float, float, int]:
    differences = [
        row[key] - reference[key]
        for key in row
        if key in reference and not math.isnan(row[key]) and not math.isnan(reference[key])
    ]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, math.sqrt(variance / n), n


def test_paired_differences_match_images_by_key_in_any_order_and_skip_undefined_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = [f"k{i}" for i in range(40)]
    values = torch.rand(40, 2, generator=generator, dtype=torch.float64)
    values[3, 0] = float("nan")
    other = values + 0.1 * torch.randn(40, 2, generator=generator, dtype=torch.float64)
    other[7, 1] = float("nan")
    row, reference = ImageScores(2), ImageScores(2)
    row.update(key_hashes(keys[:25]), values[:25])
    row.update(key_hashes(keys[25:]), values[25:])
    order = torch.randperm(40, generator=generator)[:35]  # the reference scored 35 of them, shuffled
    reference.update(key_hashes([keys[i] for i in order]), other[order])
    result = paired_differences(row.compute(), reference.compute())
    for column in range(2):
        mean, se, n = slow_paired(
            {key: float(values[i, column]) for i, key in enumerate(keys)},
            {keys[i]: float(other[i, column]) for i in order.tolist()},
        )
        assert float(result["count"][column]) == n
        assert float(result["mean"][column]) == pytest.approx(mean, rel=1e-12)
        assert float(result["se"][column]) == pytest.approx(se, rel=1e-12)


def test_a_row_against_itself_differs_by_zero_and_without_images_by_nan() -> None:
    scores = ImageScores(1)
    scores.update(key_hashes(["a", "b", "c"]), torch.tensor([[0.1], [0.5], [0.9]]))
    same = paired_differences(scores.compute(), scores.compute())
    assert float(same["mean"][0]) == 0.0 and float(same["se"][0]) == 0.0 and float(same["count"][0]) == 3
    empty = paired_differences(ImageScores(1).compute(), scores.compute())
    assert math.isnan(float(empty["mean"][0])) and float(empty["count"][0]) == 0
