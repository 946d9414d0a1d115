"""Every part of readout on random-weight torchvision models of six families at 64 px.

Per-Sample through the fx split against the hook path on the same noise; a short readout training,
export, ``readout.load`` with the module, and a heatmap; Relevance-IBA with its conservation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import readout
from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.relevance import RelevanceIBA
from readout.training.export import export_module
from readout.training.module import ReadoutModule

SIZE = 64
#: Family -> the lowest per-image conservation of Relevance-IBA accepted here (random weights,
#: batch norm at its initial statistics). EfficientNet's random activations shrink to ~1e-5 by its
#: third stage, where zennit's stabiliser (1e-6) holds back part of the relevance (docs/relevance.md).
FAMILIES = {
    "resnet18": 0.99,
    "vgg11_bn": 0.99,
    "densenet121": 0.99,
    "mobilenet_v3_small": 0.98,
    "efficientnet_b0": 0.85,
    "convnext_tiny": 0.99,
}


def random_classifier(name: str, split: str = "auto") -> Classifier:
    torch.manual_seed(0)
    classifier = load_classifier(name, weights=None, input_size=SIZE, classes=6)
    return classifier if split == "auto" else classifier.with_split("hook")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_per_sample_through_the_split_equals_the_hook_path(family: str) -> None:
    classifier = random_classifier(family)
    traced = readout.PerSample(classifier, steps=3, copies=2, fuse=False)
    traced.estimate([torch.rand(8, 3, SIZE, SIZE)], progress=False)
    hooked = readout.PerSample(random_classifier(family, split="hook"), traced.layer, steps=3, copies=2)
    hooked.load_state_dict(traced.state_dict())
    assert traced.split.traced and not hooked.split.traced
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 2, 2, *traced.shape, generator=torch.Generator().manual_seed(2))
    a, b = traced.explain(images, noise=noise), hooked.explain(images, noise=noise)
    torch.testing.assert_close(a.heatmap, b.heatmap, rtol=1e-3, atol=1e-6 * float(a.heatmap.abs().max()))
    torch.testing.assert_close(a.total_bits, b.total_bits, rtol=1e-4, atol=0.0)


def test_a_readout_trains_exports_loads_with_the_module_and_explains(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ReadoutModule(
        classifier=family,
        weights=None,
        input_size=SIZE,
        classes=6,
        beta=1.0,
        lr=1e-3,
        heatmap_every_n_steps=0,
    )
    module.attributor.estimate([torch.rand(8, 3, SIZE, SIZE)], progress=False)
    optimiser = module.configure_optimizers()
    generator = torch.Generator().manual_seed(3)
    for step in range(2):
        batch = {
            "image": torch.rand(4, 3, SIZE, SIZE, generator=generator),
            "label": torch.randint(0, 6, (4,), generator=generator),
            "key": [f"{step}-{i}" for i in range(4)],
        }
        optimiser.zero_grad()
        loss = module.shared_step(batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimiser.step()
    bundle = export_module(module, str(tmp_path / "bundle"))
    loaded = readout.load(bundle, classifier=module.attributor.classifier.model)
    images = torch.rand(2, 3, SIZE, SIZE)
    heatmaps = loaded(images)
    assert heatmaps.shape == (2, SIZE, SIZE) and bool(torch.isfinite(heatmaps).all())
    torch.testing.assert_close(heatmaps, module.attributor(images))
    with pytest.raises(ValueError, match="fingerprint"):
        readout.load(bundle, classifier=random_classifier(family).model.apply(_perturb))


def _perturb(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Conv2d):
        with torch.no_grad():
            module.weight.mul_(1.5)


def test_relevance_iba_conserves_what_it_injects(family: str) -> None:
    classifier = random_classifier(family)
    base = readout.PerSample(classifier, steps=2, copies=2, seed=0)
    base.estimate([torch.rand(8, 3, SIZE, SIZE)], progress=False)
    explanation = RelevanceIBA(base).explain(torch.rand(2, 3, SIZE, SIZE))
    conservation = explanation.conservation
    print(f"{family} at {base.layer}: conservation {[round(float(c), 4) for c in conservation]}")
    assert bool(((conservation >= FAMILIES[family]) & (conservation <= 1.01)).all()), conservation
    assert explanation.heatmap.shape == (2, SIZE, SIZE)
