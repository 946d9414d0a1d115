"""readout: which pixels a frozen classifier used, in bits.

- ``Classifier(model, mean, std, input_size, classes)``: any ``nn.Module`` with its preprocessing.
- ``load_classifier(name_or_path)``: a frozen classifier by name (``synthetic-cnn``, any torchvision
  classification model), import path, or saved file.
- ``PerSample(classifier, layer=...)``: the Per-Sample Bottleneck (fitted per image).
- ``load(bundle)``: a trained Readout Bottleneck, one forward pass per heatmap.
- ``RelevanceIBA(attributor)``: either one's information propagated to the pixels with LRP (zennit).

Every attributor is called as ``attributor(images in [0, 1], target=None) -> (B, H, W)`` bits per pixel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from readout.backbones import load_classifier, save_classifier
    from readout.bundle import load
    from readout.classifier import Classifier
    from readout.per_sample import PerSample
    from readout.readout_bottleneck import ReadoutBottleneck
    from readout.relevance import RelevanceIBA

# Imported on first use (PEP 562): `python -m readout.<command>` starts without torch, so a command
# can set up what it needs first (readout.fit its signal handlers) and `--help` answers at once.
_EXPORTS = {
    "Classifier": "readout.classifier",
    "PerSample": "readout.per_sample",
    "ReadoutBottleneck": "readout.readout_bottleneck",
    "RelevanceIBA": "readout.relevance",
    "load": "readout.bundle",
    "load_classifier": "readout.backbones",
    "save_classifier": "readout.backbones",
}

__all__ = [
    "Classifier",
    "PerSample",
    "ReadoutBottleneck",
    "RelevanceIBA",
    "load",
    "load_classifier",
    "save_classifier",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'readout' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
