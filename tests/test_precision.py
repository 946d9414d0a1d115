"""Per-Sample in bf16 autocast and compiled: the maps of fp32 eager within the stated tolerance.

Tolerance (issue #19): for the same images, noise and seed, per-image Pearson ≥ 0.99, box ratio
within 0.005 and total bits within 2% of the fp32 eager maps.
"""

from __future__ import annotations

import logging

import pytest
import torch

import readout
from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.data.synthetic import synthetic_batch
from readout.metrics.localisation import box_ratio
from readout.precision import native_bf16, resolve_precision


@pytest.fixture(scope="module")
def images() -> dict:
    """16 images of the evaluation seed, and μ/σ images of the training seed."""
    return {"eval": synthetic_batch(16, 64, seed=4250), "train": synthetic_batch(128, 64, seed=0)}


def fitted(classifier: Classifier, train: torch.Tensor, **options: object) -> readout.PerSample:
    attributor = readout.PerSample(classifier, seed=0, **options)  # type: ignore[arg-type]
    attributor.estimate([train], progress=False)
    return attributor


def assert_equal_within_tolerance(
    reference: readout.Explanation, other: readout.Explanation, boxes=None
) -> None:
    a, b = reference.heatmap.flatten(1).double(), other.heatmap.flatten(1).double()
    pearson = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, b, strict=True)])
    assert float(pearson.min()) >= 0.99, pearson
    bits = (other.total_bits / reference.total_bits - 1).abs()
    assert float(bits.max()) <= 0.02, bits
    if boxes is not None:
        ratios = [box_ratio(e.heatmap, boxes)[0].mean() for e in (reference, other)]
        assert abs(float(ratios[0] - ratios[1])) <= 0.005, ratios


def explain_both(classifier: Classifier, batch: dict, train: torch.Tensor, **options: object) -> tuple:
    reference = fitted(classifier, train, precision="fp32")
    other = fitted(classifier, train, **options)
    noise = torch.randn(
        10, len(batch["image"]), 10, *reference.shape, generator=torch.Generator().manual_seed(5)
    )
    return (
        reference.explain(batch["image"], batch["label"], noise=noise),
        other.explain(batch["image"], batch["label"], noise=noise),
        other,
    )


def test_bf16_maps_of_the_shipped_classifier_match_fp32(images: dict) -> None:
    batch = images["eval"]
    reference, bf16, _ = explain_both(
        load_classifier("synthetic-cnn"), batch, images["train"]["image"], precision="bf16"
    )
    assert_equal_within_tolerance(reference, bf16, batch["box_mask"])
    assert not torch.equal(reference.heatmap, bf16.heatmap)  # bf16 did run
    assert bf16.heatmap.dtype == torch.float32 and bf16.information.dtype == torch.float32


def test_bf16_maps_of_a_random_resnet50_at_64_px_match_fp32(images: dict) -> None:
    torch.manual_seed(0)
    classifier = load_classifier("resnet50", weights=None, input_size=64)
    batch = {key: value[:4] for key, value in images["eval"].items() if torch.is_tensor(value)}
    reference, bf16, _ = explain_both(classifier, batch, images["train"]["image"][:32], precision="bf16")
    assert_equal_within_tolerance(reference, bf16)


def test_compiled_maps_match_eager_and_the_compile_time_is_kept(images: dict) -> None:
    batch = images["eval"]
    reference, compiled, attributor = explain_both(
        load_classifier("synthetic-cnn"), batch, images["train"]["image"], precision="fp32", compile=True
    )
    assert_equal_within_tolerance(reference, compiled, batch["box_mask"])
    assert attributor._compiled is not None
    steps = attributor._compiled[1]
    assert steps.failed is None and len(steps.seconds) == 1  # one shape: 16 images x 10 copies


def test_a_failing_compile_falls_back_to_eager_with_one_warning(
    images: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(module: torch.nn.Module, **kwargs: object) -> object:
        def run(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    batch = {key: value[:4] for key, value in images["eval"].items() if torch.is_tensor(value)}
    with caplog.at_level(logging.WARNING, logger="readout.compiled"):
        reference, compiled, attributor = explain_both(
            load_classifier("synthetic-cnn"), batch, images["train"]["image"], precision="fp32", compile=True
        )
        attributor.explain(batch["image"], batch["label"])
    assert [r.message for r in caplog.records if "cannot compile" in r.message] == [
        "cannot compile synthetic-cnn after block2 (RuntimeError: no compiler here); it runs eagerly"
    ]
    torch.testing.assert_close(compiled.heatmap, reference.heatmap)


def test_auto_precision_is_bf16_only_where_native_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == "fp32"  # conftest: no native bf16 in tests
    monkeypatch.setattr("readout.precision.native_bf16", native_bf16)  # the real one
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr("readout.precision._reported", set())
    with caplog.at_level(logging.INFO, logger="readout.precision"):
        assert resolve_precision("auto", cpu) == "bf16"
        assert resolve_precision("auto", cpu) == "bf16"
    assert [r.message for r in caplog.records] == ["precision auto on cpu: bf16 (native bf16)"]
    with pytest.raises(ValueError, match="precision must be one of"):
        readout.PerSample(load_classifier("synthetic-cnn"), precision="fp16")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_on_cuda_bf16_and_compiled_steps_match_fp32_eager(
    images: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    classifier = load_classifier("synthetic-cnn").to("cuda")
    batch = {key: value.cuda() for key, value in images["eval"].items() if torch.is_tensor(value)}
    train = images["train"]["image"].cuda()
    reference = fitted(classifier, train, precision="fp32")
    noise = torch.randn(10, len(batch["image"]), 10, *reference.shape, device="cuda")
    expected = reference.explain(batch["image"], batch["label"], noise=noise)
    for options in [
        {"precision": "bf16"},
        {"precision": "fp32", "compile": True},
        {"precision": "bf16", "compile": True},
    ]:
        other = fitted(classifier, train, **options)
        assert_equal_within_tolerance(
            expected, other.explain(batch["image"], batch["label"], noise=noise), batch["box_mask"]
        )
