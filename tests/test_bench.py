"""The benchmarks run and report ratios (their numbers belong in BENCHMARKS.md, not in assertions)."""

import json

from readout.bench import main


def test_per_sample_bench_reports_a_ratio_against_the_straightforward_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "per-sample", "--classifiers", "synthetic-cnn",
          "--batch-sizes", "2", "--steps", "1", "--copies", "2"])  # fmt: skip
    result = json.loads(out.read_text())["results"][0]
    assert result["baseline"] == "straightforward (one image, full model)"
    assert set(result["rates"]) == {"batched + cached", "straightforward (one image, full model)"}
    assert all(rate > 0 for rate in result["rates"].values())
    assert "x straightforward" in capsys.readouterr().out


def test_readout_bench_compares_with_the_plain_classifier(tmp_path):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "readout", "--classifiers", "synthetic-cnn", "--batch", "2"])
    titles = [r["title"] for r in json.loads(out.read_text())["results"]]
    assert titles == [
        "readout, synthetic-cnn at 64 px, batch 2, fp32: training",
        "readout, synthetic-cnn at 64 px, batch 2, fp32: inference",
    ]
