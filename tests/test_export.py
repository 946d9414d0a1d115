import json

import fsspec
import pytest
import torch

from readout.backbones import load_classifier
from readout.bundle import CONFIG_FILE, WEIGHTS_FILE, export_bundle, load
from readout.data.synthetic import synthetic_batch
from readout.readout_bottleneck import ReadoutBottleneck
from readout.resources import checkpoint_dir
from readout.taps import hook_count


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    attributor = ReadoutBottleneck(load_classifier("synthetic-cnn", weights=None), sigma=0.5)
    attributor.estimate([torch.rand(16, 3, 64, 64)], progress=False)
    with torch.no_grad():
        for parameter in attributor.net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return attributor


def export(attributor, out):
    return export_bundle(attributor, str(out), {"name": "synthetic-cnn", "weights": None}, beta=1.0)


def test_export_then_load_gives_identical_heatmaps(trained, tmp_path):
    export(trained, tmp_path / "bundle")
    loaded = load(tmp_path / "bundle", classifier=trained.classifier)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), trained(images), rtol=0, atol=0)
    assert loaded.bottleneck.sigma == 0.5 and loaded.taps == trained.taps
    assert hook_count(trained.classifier) == 0


def test_bundle_holds_no_pickle_and_no_classifier_weights(trained, tmp_path):
    export(trained, tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / CONFIG_FILE).read_text())
    assert config["format"] == "readout-bundle/1" and config["layer"] == trained.layer
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "bundle" / WEIGHTS_FILE)).keys()
    assert not any(k.startswith("classifier.") for k in keys) and any(k.startswith("net.") for k in keys)


def test_load_through_fsspec_memory_filesystem(trained):
    url = "memory://bundles/one"
    export(trained, url)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/bundles/one/" + WEIGHTS_FILE)
    loaded = load(url, classifier=trained.classifier)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(images), trained(images))


def test_bundle_for_another_classifier_is_refused(trained, tmp_path):
    export(trained, tmp_path / "bundle")
    torch.manual_seed(1)
    other = load_classifier("synthetic-cnn", weights=None)
    with pytest.raises(ValueError, match="trained on classifier 'synthetic-cnn' with fingerprint"):
        load(tmp_path / "bundle", classifier=other)


def test_missing_and_corrupt_files_are_clear_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete readout bundle"):
        load(tmp_path / "nowhere")
    bundle = tmp_path / "bundle"
    export(trained, bundle)
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        load(bundle, classifier=trained.classifier)
    (bundle / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load(bundle, classifier=trained.classifier)


def test_load_imports_no_lightning():
    import subprocess
    import sys

    # A fresh interpreter: this test process may have imported Lightning through other tests.
    code = (
        "import sys, torch, readout; "
        f"attributor = readout.load({str(checkpoint_dir() / 'readout-demo')!r}); "
        "heatmap = attributor(torch.rand(1, 3, 64, 64)); "
        "assert heatmap.shape == (1, 64, 64) and torch.isfinite(heatmap).all(), heatmap.shape; "
        "found = sorted({m.split('.')[0] for m in sys.modules} & {'pytorch_lightning', 'lightning'}); "
        "assert not found, f'load imported {found}'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_shipped_bundle_on_cuda_gives_the_cpu_heatmaps(monkeypatch):
    # The readout is deterministic. TF32 convolutions (cuDNN allows them by default) would differ from
    # the CPU's float32 by about 1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    bundle = checkpoint_dir() / "readout-demo"
    images = synthetic_batch(4, 64, seed=9)["image"]
    expected = load(bundle)(images)
    on_cuda = load(bundle, device="cuda")
    got = on_cuda(images.cuda())
    explained = on_cuda.explain(images.cuda())
    assert got.device.type == "cuda" and expected.abs().max() > 0
    tolerance = {"rtol": 1e-3, "atol": 1e-4 * expected.abs().max().item()}
    torch.testing.assert_close(got.cpu(), expected, **tolerance)
    torch.testing.assert_close(explained.heatmap.cpu(), expected, **tolerance)


def test_a_narrower_readout_net_round_trips_with_its_width(tmp_path):
    torch.manual_seed(0)
    narrow = ReadoutBottleneck(load_classifier("synthetic-cnn", weights=None), hidden=8)
    first = narrow.net.layers[0]
    assert first.out_channels == 8 and narrow.net.layers[2].in_channels == 8
    narrow.estimate([torch.rand(16, 3, 64, 64)], progress=False)
    with torch.no_grad():
        for parameter in narrow.net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    export(narrow, tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / CONFIG_FILE).read_text())["hidden"] == 8
    loaded = load(tmp_path / "bundle", classifier=narrow.classifier)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), narrow(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="hidden width"):
        ReadoutBottleneck(load_classifier("synthetic-cnn", weights=None), hidden=0)


def test_a_bundle_written_before_the_width_option_loads_with_the_papers_widths():
    bundle = checkpoint_dir() / "readout-demo"
    assert "hidden" not in json.loads((bundle / CONFIG_FILE).read_text())
    loaded = load(bundle)
    assert loaded.net.layers[0].out_channels == loaded.net.layers[0].in_channels // 2
