"""The fixtures of the metric tests: a tiny model and inputs (helpers.py), float64 so the slow references
agree to rounding."""

import pytest
import torch
from torch import nn

from .helpers import SIZE, linear_model


@pytest.fixture
def model() -> nn.Module:
    return linear_model()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
