"""Tiny models and inputs for the metric tests: float64 so the slow references agree to rounding."""

import pytest
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


@pytest.fixture
def model() -> nn.Module:
    return linear_model()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
