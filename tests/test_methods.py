"""The method registry: one contract for every method, on a tiny random classifier."""

from __future__ import annotations

import inspect

import pytest
import torch

from readout.backbones import load_classifier, save_classifier
from readout.bundle import export_bundle
from readout.data.synthetic import synthetic_batch
from readout.evaluation.context import MethodContext, MethodSpec, reduce_channels
from readout.evaluation.methods import METHODS, build_method, method_entry
from readout.explain import EXPLAINED
from readout.readout_bottleneck import ReadoutBottleneck
from readout.taps import hook_count

#: Cheap options per registry key; every key must be here.
CHEAP: dict[str, dict] = {
    "per-sample": {"steps": 1, "copies": 2},
    "readout": {},
    "relevance-per-sample": {"steps": 1, "copies": 2},
    "relevance-readout": {},
    "saliency": {},
    "integrated-gradients": {"steps": 3},
    "smoothgrad": {"samples": 2, "batch_samples": 2},
    "grad-cam": {},
    "guided-backprop": {},
    "guided-grad-cam": {"layer": "block2"},
    "occlusion": {"window": 32},
    "lrp": {},
    "random": {},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved random synthetic-cnn, a random-init readout bundle for it and a context."""
    root = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    save_classifier(load_classifier("synthetic-cnn", weights=None), root / "tiny.safetensors", {})
    classifier = load_classifier(str(root / "tiny.safetensors"))
    readout = ReadoutBottleneck(classifier)
    readout.estimate([synthetic_batch(8, 64, seed=1)["image"]], progress=False)
    export_bundle(readout, str(root / "bundle"), {"name": str(root / "tiny.safetensors")}, beta=1.0)
    context = MethodContext(statistics_samples=8, statistics_cache=str(root / "stats"))
    batch = synthetic_batch(2, 64, seed=2)
    return classifier, context, str(root / "bundle"), batch


def options(key: str, bundle: str) -> dict:
    return {**CHEAP[key], **({"bundle": bundle} if METHODS[key].bundle_option else {})}


def test_every_method_has_cheap_options():
    assert set(CHEAP) == set(METHODS)


@pytest.mark.parametrize("key", sorted(METHODS))
def test_method_gives_finite_maps_and_leaves_the_classifier_alone(key, setup):
    classifier, context, bundle, batch = setup
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    inplace = [m.inplace for m in classifier.modules() if hasattr(m, "inplace")]
    method = build_method(MethodSpec(key, key, options(key, bundle)), classifier, context)
    maps = method(batch["image"], batch["label"])
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and not maps.requires_grad
    assert method(batch["image"], None).shape == (2, 64, 64)
    assert hook_count(classifier) == 0
    assert [m.inplace for m in classifier.modules() if hasattr(m, "inplace")] == inplace
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())


def test_reductions_the_obvious_way():
    a = torch.randn(2, 3, 4, 5)
    assert torch.allclose(reduce_channels(a, "sum"), a[:, 0] + a[:, 1] + a[:, 2])
    assert torch.allclose(reduce_channels(a, "abs-sum"), a[:, 0].abs() + a[:, 1].abs() + a[:, 2].abs())
    expected = torch.maximum(torch.maximum(a[:, 0].abs(), a[:, 1].abs()), a[:, 2].abs())
    assert torch.equal(reduce_channels(a, "max-abs"), expected)
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_channels(a, "median")  # type: ignore[arg-type]


def test_random_maps_depend_on_the_image_only(setup):
    classifier, context, _, batch = setup
    method = build_method(MethodSpec("r", "random"), classifier, context)
    both = method(batch["image"])
    assert torch.equal(method(batch["image"][1:]), both[1:])
    assert not torch.equal(both[0], both[1])


def test_smoothgrad_noise_follows_the_pixels(setup):
    """Noise is seeded from the pixels: the same batch gives the same SmoothGrad map twice."""
    classifier, context, _, batch = setup
    method = build_method(MethodSpec("s", "smoothgrad", CHEAP["smoothgrad"]), classifier, context)
    torch.manual_seed(1)
    first = method(batch["image"], batch["label"])
    torch.manual_seed(2)
    assert torch.equal(first, method(batch["image"], batch["label"]))


def test_per_sample_and_relevance_rows_share_one_fit(setup, monkeypatch):
    classifier, context, _, batch = setup
    shared = MethodContext(context.statistics_shards, 8, context.statistics_cache)
    plain = build_method(MethodSpec("p", "per-sample", CHEAP["per-sample"]), classifier, shared)
    relevance = build_method(MethodSpec("r", "relevance-per-sample", CHEAP["per-sample"]), classifier, shared)
    (base,) = shared._bases[classifier].values()
    calls = []
    original = base.attributor.explain
    monkeypatch.setattr(base.attributor, "explain", lambda *a: calls.append(1) or original(*a))
    images = batch["image"].clone()
    plain(images, batch["label"])
    relevance(images, batch["label"])
    assert len(calls) == 1
    plain(images.clone(), batch["label"])
    assert len(calls) == 2


def test_shared_explanation_reseeds_from_the_pixels(setup):
    classifier, context, _, batch = setup
    method = build_method(MethodSpec("p", "per-sample", CHEAP["per-sample"]), classifier, context.unshared())
    first = method(batch["image"], batch["label"])
    assert torch.equal(first, method(batch["image"].clone(), batch["label"]))


def test_bad_rows_name_themselves():
    with pytest.raises(KeyError, match="row 'x'.*unknown method 'nope'"):
        method_entry(MethodSpec("x", "nope"))
    with pytest.raises(TypeError, match="row 'y'.*no option.*'betta'"):
        method_entry(MethodSpec("y", "per-sample", {"betta": 1}))


def test_the_attributor_of_a_method_takes_the_options_of_its_row():
    """One registry: ``readout.explain`` builds the same four methods from the same options as rows."""
    with_attributor = {name: entry for name, entry in METHODS.items() if entry.attributor is not None}
    assert (
        sorted(with_attributor)
        == EXPLAINED
        == [
            "per-sample",
            "readout",
            "relevance-per-sample",
            "relevance-readout",
        ]
    )
    for name, entry in with_attributor.items():
        row = inspect.signature(entry.build).parameters
        made = inspect.signature(entry.attributor).parameters
        assert [(p.name, p.default) for p in list(row.values())[2:]] == [
            (p.name, p.default) for p in list(made.values())[2:]
        ], name
