import json

from readout.compare_relevance import main


def test_command_writes_table_and_figure(tmp_path):
    argv = ["--random-init", "--n", "2", "--batch-size", "2", "--stats-samples", "8", "--only", "64px-block3"]
    variants = ["--variants", "EpsilonPlusFlat", "EpsilonPlusFlat, mask_dead"]
    results = main([*argv, *variants, "--out", str(tmp_path)])
    assert [r["setting"] for r in results] == ["64px-block3"]
    rows = results[0]["rows"]
    assert len(rows) == 3
    assert all(abs(row["conservation"] - 1) < 1e-3 for row in rows[1:])
    assert (tmp_path / "figure-64px-block3.png").stat().st_size > 0
    assert "| IBA (upsampled) |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["images"] == 2
