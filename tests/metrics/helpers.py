"""Tiny models and slow references that several metric tests use (the fixtures: conftest.py): float64
so the slow references agree to rounding."""

import math

import torch
from torch import nn

from readout.classifier import Classifier

SIZE = 16


def linear_model(classes: int = 4, seed: int = 0) -> nn.Module:
    """images (B, 3, 16, 16) -> logits (B, classes): one linear layer, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, classes)).double().eval()


def tiny_classifier(seed: int = 0) -> Classifier:
    """A readout Classifier with 3 parameterised stages (conv, conv, fc), float64."""
    torch.manual_seed(seed)
    stages = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(1),
        nn.Linear(64, 3),
    )
    aliases = {"conv1": "0", "fc": "6"}  # stage 2 (a conv) has no alias: it is labelled by its path
    classifier = Classifier(
        stages, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), SIZE, ["a", "b", "c"], name="tiny", aliases=aliases
    )
    return classifier.double()


def slow_tiles(height: int, width: int, tile: int) -> list[list[tuple[int, int]]]:
    """Pixels of each tile in raster order, the obvious way."""
    tiles = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            tiles.append(
                [
                    (y, x)
                    for y in range(top, min(top + tile, height))
                    for x in range(left, min(left + tile, width))
                ]
            )
    return tiles


def slow_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
