"""readout: which pixels a frozen classifier used, in bits.

- ``Classifier(model, mean, std, input_size, classes)``: any ``nn.Module`` with its preprocessing.
- ``load_classifier(name_or_path)``: a frozen classifier by name (``synthetic-cnn``, any torchvision
  classification model), import path, or saved file.
- ``PerSample(classifier, layer=...)``: the Per-Sample Bottleneck (fitted per image).
- ``load(bundle)``: a trained Readout Bottleneck, one forward pass per heatmap.
- ``RelevanceIBA(attributor)``: either one's information propagated to the pixels with LRP (zennit).

Every attributor is called as ``attributor(images in [0, 1], target=None) -> (B, H, W)`` bits per pixel.
"""

from readout.backbones import load_classifier, save_classifier
from readout.classifier import Classifier
from readout.export import load
from readout.per_sample import PerSample
from readout.readout_bottleneck import ReadoutBottleneck
from readout.relevance import RelevanceIBA

__all__ = [
    "Classifier",
    "PerSample",
    "ReadoutBottleneck",
    "RelevanceIBA",
    "load",
    "load_classifier",
    "save_classifier",
]
