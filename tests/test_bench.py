"""The benchmarks run and report ratios (their numbers belong in BENCHMARKS.md, not in assertions)."""

import json
import math

import pytest

from readout.bench import main, write_stored_sizes
from readout.data.shards import make_loader
from readout.data.transforms import eval_transform


def sane(rates: dict[str, float]) -> bool:
    return all(rate > 0 and math.isfinite(rate) for rate in rates.values())


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


@pytest.mark.ddp
def test_ddp_bench_reports_the_scaling_efficiency_of_two_processes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "ddp", "--batch", "2", "--steps", "1"])
    [result] = json.loads(out.read_text())["results"]
    assert set(result["rates"]) == {"1 process", "2 processes"} and sane(result["rates"])
    assert result["scaling_efficiency"] == pytest.approx(
        result["rates"]["2 processes"] / (2 * result["rates"]["1 process"])
    )
    assert (result["processes"], result["threads_per_process"]) == (2, 1)
    assert set(result["cores_busy"]) == set(result["rates"]) and sane(result["cores_busy"])
    assert sane(result["images_per_cpu_second"])
    printed = capsys.readouterr().out
    assert "1 thread(s) per process, gloo" in printed and "scaling efficiency = " in printed


def test_data_bench_compares_stored_sizes_worker_counts_and_decoders(tmp_path):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "data", "--images", "4", "--batch", "2", "--batches", "1",
          "--workers", "0", "--full-size", "96", "--resize-shorter", "48", "--size", "32"])  # fmt: skip
    stored, workers, decode = json.loads(out.read_text())["results"]
    assert list(stored["rates"]) == ["stored at full size (96 px)", "stored resized (shorter side 48)"]
    assert list(workers["rates"]) == ["0 worker(s)"]
    assert list(decode["rates"]) == ["PIL, one by one (CPU)", "decode_jpeg, batched (cpu)"]
    assert all(sane(result["rates"]) for result in (stored, workers, decode))


def test_stored_sizes_hold_the_same_images_at_full_size_and_resized(tmp_path):
    stored = write_stored_sizes(tmp_path, n=3, full_size=96, resize_shorter=48)
    shapes = {}
    for label, shards in stored.items():
        loader = make_loader(shards, "eval", 3, 0, transform=eval_transform(None, None))
        [batch] = list(loader)
        shapes[label] = (tuple(batch["image"].shape), sorted(batch["key"]))
    assert list(shapes.values())[0][0] == (3, 3, 96, 96)
    assert list(shapes.values())[1][0] == (3, 3, 48, 48)
    assert list(shapes.values())[0][1] == list(shapes.values())[1][1]
