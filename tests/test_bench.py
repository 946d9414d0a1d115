"""The benchmarks run and report ratios (their numbers belong in BENCHMARKS.md, not in assertions)."""

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from readout.data.shards import make_loader
from readout.data.transforms import eval_transform
from readout.readout_bottleneck import readout_loss
from readout.tools.bench import readout as bench_readout
from readout.tools.bench.cli import build_parser, main
from readout.tools.bench.data import write_stored_sizes


def sane(rates: dict[str, float]) -> bool:
    return all(rate > 0 and math.isfinite(rate) for rate in rates.values())


def test_per_sample_bench_reports_a_ratio_against_the_straightforward_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "per-sample", "--classifiers", "synthetic-cnn",
          "--batch-sizes", "2", "--steps", "1", "--copies", "2",
          "--variants", "bf16", "compiled", "compiled-bf16"])  # fmt: skip
    result = json.loads(out.read_text())["results"][0]
    assert result["baseline"] == "straightforward (one image, full model)"
    assert set(result["rates"]) == {
        "batched + cached",
        "batched + cached, batch norm not folded",
        "batched, hook path (full model per step)",
        "batched + cached, bf16 autocast",
        "batched + cached, compiled",
        "batched + cached, compiled, bf16 autocast",
        "straightforward (one image, full model)",
    }
    assert all(rate > 0 for rate in result["rates"].values())
    compiled = result["compile_seconds"]
    assert set(compiled) == {"batched + cached, compiled", "batched + cached, compiled, bf16 autocast"}
    assert all(seconds > 0 for seconds in compiled.values())
    printed = capsys.readouterr().out
    assert "x straightforward" in printed and "compile time of 'batched + cached, compiled'" in printed


def test_relevance_bench_gives_the_conservation_of_both_precisions(tmp_path):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "relevance", "--images", "2"])
    result = json.loads(out.read_text())["results"][0]
    assert set(result["rates"]) == {"fp32", "bf16 autocast"} and result["baseline"] == "fp32"
    fp32 = result["conservation"]["fp32"]
    assert len(fp32) == 2 and all(0.95 <= value <= 1.05 for value in fp32)


def count_training_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bench's calls of the product's loss, ``readout_loss`` (one entry per call: its batch
    size), the function ``ReadoutModule.training_step`` computes its loss with."""
    calls: list[int] = []

    def counting(attributor, images, *args, **kwargs):
        calls.append(len(images))
        return readout_loss(attributor, images, *args, **kwargs)

    monkeypatch.setattr(bench_readout, "readout_loss", counting)
    return calls


def test_readout_bench_compares_with_the_plain_classifier(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    calls = count_training_steps(monkeypatch)
    main(["--repeats", "1", "--json", str(out), "readout", "--classifiers", "synthetic-cnn", "--batch", "2"])
    results = json.loads(out.read_text())["results"]
    titles = [r["title"] for r in results]
    assert titles == [
        "readout, synthetic-cnn at 64 px, batch 2, fp32: training",
        "readout, synthetic-cnn at 64 px, batch 2, fp32: inference",
    ]
    training, inference = results
    variants = ["readout step (shared first pass)", "readout step (two full passes)"]
    assert list(training["rates"]) == ["plain training step", *variants] and sane(training["rates"])
    assert list(inference["rates"]) == ["plain inference", "readout heatmaps"] and sane(inference["rates"])
    assert training["mib_per_image"] == dict.fromkeys(training["rates"])  # no CUDA, no memory figure
    # the readout variants time the product's own loss: warm-up + 1 repeat each, batch 2
    assert calls == [2] * (2 * len(variants))


def test_readout_bench_times_narrower_readout_nets_beside_the_papers(tmp_path):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "readout", "--classifiers", "synthetic-cnn", "--batch", "2",
          "--hidden", "16", "8"])  # fmt: skip
    training, inference = json.loads(out.read_text())["results"]
    assert {"readout step (hidden 16)", "readout step (hidden 8)"} <= set(training["rates"])
    assert list(inference["rates"]) == [
        "plain inference",
        "readout heatmaps",
        "readout heatmaps (hidden 16)",
        "readout heatmaps (hidden 8)",
    ]
    assert sane(training["rates"]) and sane(inference["rates"])


def test_readout_bench_gives_bf16_against_fp32_as_a_direct_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--repeats", "1", "--json", str(out), "readout", "--classifiers", "synthetic-cnn", "--batch", "2",
          "--bf16", "--channels-last"])  # fmt: skip
    results = json.loads(out.read_text())["results"]
    title = "readout, synthetic-cnn at 64 px, batch 2, channels_last"
    assert [r["title"] for r in results] == [
        f"{title}, fp32: training",
        f"{title}, fp32: inference",
        f"{title}, bf16: training",
        f"{title}, bf16: inference",
        f"{title}: bf16 against fp32",
    ]
    direct = results[-1]
    assert list(direct["rates"]) == ["readout step, fp32", "readout step, bf16"] and sane(direct["rates"])
    assert direct["baseline"] == "readout step, fp32"
    assert "x readout step, fp32" in capsys.readouterr().out


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


def test_data_bench_compares_stored_sizes_worker_counts_and_decoders(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    calls = count_training_steps(monkeypatch)
    main(["--repeats", "1", "--json", str(out), "data", "--images", "4", "--batch", "2", "--batches", "1",
          "--workers", "0", "1", "--full-size", "96", "--resize-shorter", "48", "--size", "32",
          "--classifier", "synthetic-cnn"])  # fmt: skip
    stored, workers, decode, transform, against = json.loads(out.read_text())["results"]
    assert list(stored["rates"]) == ["stored at full size (96 px)", "stored resized (shorter side 48)"]
    assert list(workers["rates"]) == ["0 worker(s)", "1 worker(s)"]
    assert list(decode["rates"]) == ["PIL, one by one (CPU)", "decode_jpeg, batched (cpu)"]
    assert transform["title"] == "decode + train transform to 32 px, 2 JPEGs at 96 px, 1 thread"
    assert list(transform["rates"]) == [
        "PIL + train transform, one by one (CPU)",
        "decode_jpeg + train crops, batched (cpu)",
    ]
    assert all(sane(result["rates"]) for result in (stored, workers, decode, transform, against))
    # the loader of each worker count against the product's training step, same size and batch
    assert against["title"] == (
        "data, loader against the readout training step of synthetic-cnn at 32 px, batch 2, fp32, on cpu"
    )
    assert list(against["rates"]) == ["readout training step", "0 worker(s)", "1 worker(s)"]
    assert against["baseline"] == "readout training step" and calls == [2, 2]
    step = against["rates"]["readout training step"]
    for name, rate in workers["rates"].items():
        assert against["rates"][name] == rate
        assert against["loader_over_step"][name] == pytest.approx(rate / step)
    printed = capsys.readouterr().out
    assert f"{against['loader_over_step']['1 worker(s)']:6.2f}x readout training step" in printed


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


ROOT = Path(__file__).resolve().parents[1]


def documented_bench_commands() -> list[str]:
    """Every ``python -m readout.bench ...`` that BENCHMARKS.md, the README, docs/ and the Makefile give."""
    files = [ROOT / "BENCHMARKS.md", ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    commands = [c for f in files for c in re.findall(r"`(python -m readout\.bench[^`]*)`", f.read_text())]
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    commands += [
        f"python -m readout.bench{rest}" for rest in re.findall(r"-m readout\.bench([^\n]*)", makefile)
    ]
    return commands


def test_every_documented_bench_command_parses():
    # A top-level option after the subcommand (`per-sample ... --device cuda`) is an argparse error:
    # the GPU rows of BENCHMARKS.md carried that mistake before a GPU first ran them.
    commands = documented_bench_commands()
    assert len(commands) >= 10 and any("--device cuda" in c for c in commands)
    for command in commands:
        words = shlex.split(command.replace("--processes N", "--processes 2"))[3:]
        if not words or words[0] in {"...", "{per-sample,readout,ddp,data}"}:
            continue  # prose about the tool, not a command
        args = build_parser().parse_args(words)
        assert args.command in {"per-sample", "relevance", "readout", "ddp", "data"}, command
