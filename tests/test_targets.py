"""Target classes: the same checks and the same top-1 for every attributor, method and metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from readout.metrics.chunks import resolve_targets
from readout.targets import resolve_target


class Counting(nn.Module):
    """Logits that prefer class 2; counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([0.0, 1.0, 3.0]).expand(len(images), 3)


def test_no_target_is_the_top1_and_a_given_one_runs_no_forward_pass():
    model, images = Counting(), torch.rand(4, 3, 8, 8)
    assert resolve_targets(model, images, None, chunk_size=3).tolist() == [2, 2, 2, 2]
    assert model.calls == 2  # chunks of 3 and 1
    assert resolve_targets(model, images, torch.tensor([0, 1, 2, 0]), 3, classes=3).tolist() == [0, 1, 2, 0]
    assert resolve_target(1, 4, "cpu", lambda: model(images)).tolist() == [1, 1, 1, 1]
    assert model.calls == 2


@pytest.mark.parametrize(
    ("target", "classes", "message"),
    [
        (torch.tensor([0, 1]), None, "the batch has 4 images"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), None, "integer class indices"),
        (torch.tensor([0, 1, 3, 0]), 3, r"class indices in \[0, 3\)"),
    ],
)
def test_bad_targets_are_refused_by_the_metrics_as_by_the_attributors(target, classes, message):
    with pytest.raises(ValueError, match=message):
        resolve_targets(Counting(), torch.rand(4, 3, 8, 8), target, 4, classes=classes)
