"""μ/σ estimated once per classifier, layer and source, and kept on disk (readout.statistics_cache)."""

import ast
from pathlib import Path

import pytest
import torch

from readout.backbones import load_classifier
from readout.per_sample import PerSample
from readout.statistics_cache import (
    MissingStatisticsData,
    StatisticsSource,
    cache_path,
    with_cached_statistics,
)

ROOT = Path(__file__).resolve().parents[1]


def attributor(name: str = "synthetic-cnn") -> PerSample:
    torch.manual_seed(0)
    return PerSample(load_classifier(name, weights=None), steps=1, copies=1)


def test_an_estimate_is_stored_then_loaded_instead_of_estimated_again(tmp_path, monkeypatch):
    source = StatisticsSource(samples=16)
    first = attributor()
    with_cached_statistics(first, source, tmp_path)
    path = cache_path(first, source, tmp_path)
    assert path.is_file() and first.statistics.count.item() == 16

    second = attributor()
    monkeypatch.setattr(PerSample, "estimate", lambda *a, **k: pytest.fail("estimated again"))
    with_cached_statistics(second, source, tmp_path)
    torch.testing.assert_close(second.statistics.mean, first.statistics.mean)
    # Another number of samples is another entry.
    assert cache_path(second, StatisticsSource(samples=32), tmp_path) != path


def test_an_unreadable_entry_is_estimated_again_and_replaced(tmp_path, capsys):
    source = StatisticsSource(samples=8)
    model = attributor()
    path = cache_path(model, source, tmp_path)
    path.write_bytes(b"half a file")  # what a kill during a non-atomic write left behind
    with_cached_statistics(model, source, tmp_path)
    assert "unreadable" in capsys.readouterr().err and model.statistics.count.item() == 8
    again = attributor()
    with_cached_statistics(again, source, tmp_path)  # the replaced entry loads
    torch.testing.assert_close(again.statistics.std, model.statistics.std)
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_classifier_other_than_the_synthetic_one_needs_named_images(tmp_path):
    model = PerSample(load_classifier("resnet18", weights=None, classes=3, input_size=32), steps=1, copies=1)
    with pytest.raises(MissingStatisticsData, match="needs μ/σ over data for 'resnet18'.*--estimate-images"):
        with_cached_statistics(model, StatisticsSource(samples=4), tmp_path)


def test_no_module_imports_the_explain_cli():
    # Library code (the method registry, the evaluation) took the cache from readout.explain before.
    for file in (ROOT / "readout").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            assert "readout.explain" not in names, file
