import json

import torch

from readout.backbones import load_classifier
from readout.bundle import export_bundle
from readout.readout_bottleneck import ReadoutBottleneck
from readout.tools.compare_relevance import Setting, main, readouts_of


def test_command_writes_table_and_figure(tmp_path):
    argv = ["--random-init", "--n", "2", "--batch-size", "2", "--stats-samples", "8", "--only", "64px-block3"]
    variants = ["--variants", "EpsilonPlusFlat", "EpsilonPlusFlat, mask_dead"]
    results = main([*argv, *variants, "--out", str(tmp_path)])
    assert [r["setting"] for r in results] == ["64px-block3"]
    rows = results[0]["rows"]
    assert len(rows) == 3
    assert all(abs(row["conservation"] - 1) < 1e-3 for row in rows[1:])
    assert all(
        low <= row["conservation"] <= high for row in rows[1:] for low, high in [row["conservation_range"]]
    )
    assert rows[0]["conservation_range"] is None
    assert (tmp_path / "figure-64px-block3.png").stat().st_size > 0
    assert "| IBA (upsampled) |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["images"] == 2


def test_each_readout_bundle_goes_to_the_setting_of_its_classifier_and_layer(tmp_path):
    torch.manual_seed(0)
    small, other = (
        load_classifier("synthetic-cnn", weights=None),
        load_classifier("synthetic-cnn", weights=None),
    )
    settings = [
        Setting("a-block1", small, "block1", 64),
        Setting("a-block3", small, "block3", 64),
        Setting("b-block3", other, "block3", 64),
    ]
    bundles = {}
    for name, classifier, layer in [("at-block3", small, "block3"), ("at-block2", small, "block2"),
                                    ("other", other, "block1")]:  # fmt: skip
        bundles[name] = export_bundle(
            ReadoutBottleneck(classifier, layer), str(tmp_path / name), {"name": "synthetic-cnn"}, beta=3.0
        )
    paths = list(bundles.values())
    assert readouts_of(settings[0], paths, settings) == [bundles["at-block2"]]  # no block2 setting: first
    assert readouts_of(settings[1], paths, settings) == [bundles["at-block3"]]
    assert readouts_of(settings[2], paths, settings) == [bundles["other"]]
    bigger = [Setting("a-128", small, "block3", 128)]
    assert readouts_of(bigger[0], paths, bigger) == []  # trained at another input size
