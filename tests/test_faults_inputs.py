"""Bad inputs (issue 6): bad configs fail before any data is read, loading never runs code, odd images.

Runs are tiny runs of ``readout.fit`` (helpers.fit_args: random-init synthetic-cnn on the 64-px
``shards`` of conftest.py, one thread, a few steps).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fit_args
from PIL import Image

from readout.backbones import load_classifier, save_classifier
from readout.bundle import load
from readout.data.shards import ShardDataset
from readout.explain import main as explain
from readout.training.checkpointing import UnsafeCheckpointError
from readout.training.export import export_checkpoint
from readout.training.fit import main as fit

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------
# Bad configs: a clear error naming the field and the valid options, before any data is read


@pytest.fixture
def no_data_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ShardDataset) -> None:
        raise AssertionError("data was read before the config error")

    monkeypatch.setattr(ShardDataset, "__iter__", refuse)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            ["--model.classifier", "resnet5O"],
            r"model\.classifier: unknown classifier 'resnet5O'.*a torchvision classification model",
        ),
        (["--model.layer", "conv9"], r"model\.layer 'conv9' is not a layer .*valid: conv1, block1, block2"),
        (
            ["--model.layer", "fc"],
            r"model\.layer 'fc' is the classifier's output.*valid: .*block3 or any module path$",
        ),
        (["--model.taps", "[block1, head]"], r"model\.taps \['head'\] are not layers.*valid: .*block3, fc"),
        (["--model.taps", "[block1, fc, block1]"], r"model\.taps lists \['block1'\] more than once"),
        (["--model.taps", "[]"], r"model\.taps is empty: .*valid: conv1, block1, block2, block3, fc"),
        (["--model.beta", "0"], r"model\.beta must be > 0"),
        (["--model.beta", "-1"], r"model\.beta must be > 0"),
        (["--model.lr", "0"], r"model\.lr must be > 0, got 0"),
        (["--model.lr=-1e-3"], r"model\.lr must be > 0, got -0\.001"),
        (
            ["--data.image_size", "32"],
            r"data\.image_size is 32 but model\.input_size is 64, the default of 'synthetic-cnn'.*same value",
        ),
        (["--model.input_size", "48"], r"data\.image_size is 64 but model\.input_size is 48: "),
        (["--data.train_shards", "nowhere/train-{0..2}.tar"], r"data\.train_shards: 3 of 3 shards .*nowhere"),
        (["--data.val_shards", "nowhere/val.tar"], r"data\.val_shards: .*nowhere/val\.tar"),
        (["--data.max_bad_share", "1.5"], r"data\.max_bad_share must be in \[0, 1\]"),
    ],
    ids=[
        "backbone",
        "layer",
        "output-as-layer",
        "tap",
        "tap-twice",
        "no-taps",
        "beta-0",
        "beta-negative",
        "lr-0",
        "lr-negative",
        "image-size",
        "input-size",
        "train",
        "val",
        "share",
    ],  # fmt: skip
)
def test_a_bad_config_names_its_field_before_any_data_is_read(
    arguments, expected, shards, tmp_path, no_data_read, no_slurm
):
    with pytest.raises((ValueError, FileNotFoundError, KeyError), match=expected):
        fit([*fit_args(shards, tmp_path / "run"), *arguments])


def test_a_choice_outside_its_options_is_refused_by_the_parser(shards, tmp_path, capsys, no_data_read):
    with pytest.raises(SystemExit):
        fit([*fit_args(shards, tmp_path / "run"), "--model.nonfinite", "ignore"])
    assert "model.nonfinite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: its directory holds checkpoints/last.ckpt (step 6) and export/."""
    run = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            patch.delenv(key)
        fit(fit_args(shards, run, every=3))
    torch.set_num_threads(threads)
    return run


@pytest.mark.fault(
    "a checkpoint of another classifier", "resume", "refused before any data is read, naming both classifiers"
)
def test_a_checkpoint_of_another_classifier_is_refused_before_any_data_is_read(
    trained, shards, tmp_path, no_data_read, no_slurm
):
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["readout_classifier"] = {"name": "resnet50", "fingerprint": "0123456789abcdef"}
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(
        ValueError, match=r"trained on classifier 'resnet50'.*set model\.classifier/model\.weights"
    ):
        fit([*fit_args(shards, tmp_path / "run"), "--ckpt_path", str(tmp_path / "other.ckpt")])


# ------------------------------------------------------------------------------------------------------
# Loading is safe: checkpoints with weights_only=True, bundles from safetensors and JSON only


class RunsCode:
    """Unpickling this object would run ``marker.write_text('ran')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def poison(checkpoint: Path, out: Path, marker: Path) -> Path:
    """``checkpoint`` with an object in its hyper-parameters that writes ``marker`` when unpickled."""
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["note"] = RunsCode(marker)
    torch.save(content, out)
    return out


@pytest.fixture
def poisoned(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A real checkpoint with a code-running object added; (its path, the marker it would write)."""
    last = trained / "checkpoints" / "last.ckpt"
    live = poison(last, tmp_path / "live.ckpt", tmp_path / "live.txt")
    torch.load(live, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert (tmp_path / "live.txt").read_text() == "ran"
    return poison(last, tmp_path / "poisoned.ckpt", tmp_path / "ran.txt"), tmp_path / "ran.txt"


@pytest.mark.fault(
    "a checkpoint carrying a pickle payload",
    "resume, export",
    "refused, naming the object; the payload never runs",
)
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_run(poisoned, shards, tmp_path, no_slurm):
    path, marker = poisoned
    with pytest.raises(UnsafeCheckpointError, match=r"poisoned\.ckpt holds objects other than tensors.*exec"):
        fit([*fit_args(shards, tmp_path / "run"), "--ckpt_path", str(path)])
    with pytest.raises(UnsafeCheckpointError, match="never runs code"):
        export_checkpoint(str(path), str(tmp_path / "bundle"))
    assert not marker.exists()


def test_resume_asks_lightning_for_weights_only_and_our_checkpoint_io_insists(trained, poisoned, no_slurm):
    from readout.training.checkpointing import ReadoutCheckpointIO

    path, marker = poisoned
    with pytest.raises(UnsafeCheckpointError):
        ReadoutCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    assert ReadoutCheckpointIO().load_checkpoint(trained / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_a_fit_checkpoint_exports_to_the_bundle_fit_wrote(trained, tmp_path):
    """``python -m readout.export CKPT``: the LightningCLI's own hyper-parameters do not get in the way."""
    torch.manual_seed(0)  # the random-init classifier of the run (seed_everything 0), same fingerprint
    export_checkpoint(str(trained / "checkpoints" / "last.ckpt"), str(tmp_path / "bundle"))
    name = "readout.safetensors"
    assert (tmp_path / "bundle" / name).read_bytes() == (trained / "export" / name).read_bytes()
    exported = json.loads((tmp_path / "bundle" / "readout.json").read_text())
    fitted = json.loads((trained / "export" / "readout.json").read_text())
    assert fitted.pop("training")["steps"] == 6  # only the fit knows how it trained
    assert exported == fitted


def test_bundles_load_from_safetensors_and_json_only(trained, monkeypatch):
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bundle was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    torch.manual_seed(0)  # the random-init classifier of the run
    attributor = load(trained / "export")
    assert attributor(torch.rand(1, 3, 64, 64)).shape == (1, 64, 64)
    assert sorted(p.name for p in (trained / "export").iterdir()) == ["readout.json", "readout.safetensors"]


@pytest.mark.fault(
    "a bundle carrying a pickle payload",
    "readout.load",
    "refused as not safetensors, naming the file; the payload never runs",
)
def test_a_bundle_whose_weights_are_a_pickle_is_refused_and_never_run(trained, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "readout.json").write_text((trained / "export" / "readout.json").read_text())
    marker = tmp_path / "ran.txt"
    torch.save({"weights": RunsCode(marker)}, bundle / "readout.safetensors")  # a pickle under the name
    torch.manual_seed(0)  # the random-init classifier of the run
    with pytest.raises(Exception, match=r"readout\.safetensors") as raised:
        load(bundle)
    assert not isinstance(raised.value, AssertionError), raised.value
    assert not marker.exists(), "loading the bundle ran its payload"


# ------------------------------------------------------------------------------------------------------
# readout.explain on a decompression bomb


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height RGB pixels but holds one row's worth of data: PIL's bomb check
    refuses it at open, before decoding, so the test needs no memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * (1 + 3 * 16))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_explain_reports_a_decompression_bomb_and_finishes_the_rest(tmp_path):
    torch.manual_seed(0)
    classifier = tmp_path / "random-cnn"
    save_classifier(load_classifier("synthetic-cnn", weights=None), classifier, {"note": "random, for tests"})
    images = tmp_path / "images"
    images.mkdir()
    png_header_only(images / "huge.png", 40_000, 40_000)  # 1.6 Gpx, PIL's limit is 2 x 89.5 Mpx
    (images / "empty.jpg").write_bytes(b"")
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(images / "plain.png")
    out = tmp_path / "out"
    code = explain(
        [
            "--classifier", str(classifier.with_suffix(".safetensors")), "--images", str(images / "*"),
            "--out", str(out), "--steps", "1", "--copies", "1", "--estimate-samples", "16",
            "--cache", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1
    assert set(summary["images"]) == {"plain"}
    assert set(summary["failed"]) == {str(images / "huge.png"), str(images / "empty.jpg")}
    assert "DecompressionBomb" in summary["failed"][str(images / "huge.png")]
