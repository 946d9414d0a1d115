"""The shipped classifier's training command: it measures a saved classifier and writes one that loads."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from readout.backbones import load_classifier
from readout.data.synthetic import CLASSES
from readout.resources import checkpoint_dir
from readout.tools.train_classifier import evaluate, main


def test_evaluate_only_measures_the_shipped_classifier(capsys: pytest.CaptureFixture[str]) -> None:
    meta = (checkpoint_dir() / "synthetic-cnn.json").read_text()
    argv = ["--evaluate-only", "--out", str(checkpoint_dir() / "synthetic-cnn"), "--n-eval", "64"]
    accuracy = main(argv)  # the default --min-accuracy 0.95 would exit 1 below it
    assert accuracy >= 0.9
    assert f"top-1 {accuracy:.4f} on 64 images of seed 1000" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--min-accuracy", "1.01"])
    assert exit_.value.code == 1
    assert (checkpoint_dir() / "synthetic-cnn.json").read_text() == meta  # measuring writes nothing


def test_the_training_cli_writes_weights_and_metadata_that_load(tmp_path: Path) -> None:
    out = tmp_path / "tiny-cnn"
    argv = ["--out", str(out), "--n-train", "64", "--epochs", "1", "--batch-size", "32", "--size", "32"]
    argv += ["--n-eval", "16", "--min-accuracy", "0"]
    accuracy = main(argv)
    assert out.with_suffix(".safetensors").is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "readout-classifier/2"
    assert meta["source"] == {"builtin": "synthetic-cnn", "num_classes": 6} and meta["input_size"] == 32
    assert meta["classes"] == list(CLASSES)
    assert meta["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert meta["training"]["command"] == "python -m readout.tools.train_classifier " + shlex.join(argv)
    assert meta["training"]["n_train"] == 64 and meta["training"]["seed"] == 0
    evaluation = meta["evaluation"]
    assert evaluation["top1"] == accuracy and 0 <= accuracy <= 1
    assert (evaluation["n"], evaluation["size"]) == (16, 32)
    # The recorded command measures the same number again.
    command = shlex.split(evaluation["command"])
    assert command[:3] == ["python", "-m", "readout.tools.train_classifier"] and "--evaluate-only" in command
    assert main([*command[3:], "--min-accuracy", "0"]) == accuracy
    loaded = load_classifier(str(out.with_suffix(".safetensors")))
    assert evaluate(loaded, 16, 32, seed=evaluation["seed"]) == accuracy


def test_training_from_init_starts_at_the_saved_weights(tmp_path: Path) -> None:
    # A vanishing learning rate leaves the convolutions where they started: at the init's weights.
    shipped = load_classifier("synthetic-cnn")
    out = tmp_path / "fine-tuned"
    main(["--out", str(out), "--init", str(checkpoint_dir() / "synthetic-cnn"), "--n-train", "32"]
         + ["--epochs", "1", "--batch-size", "32", "--size", "32", "--lr", "1e-12", "--n-eval", "8"]
         + ["--min-accuracy", "0"])  # fmt: skip
    tuned = load_classifier(str(out.with_suffix(".safetensors"))).model.state_dict()
    for key, value in shipped.model.state_dict().items():
        if key.endswith(".weight") and value.dim() == 4:
            torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-6)
