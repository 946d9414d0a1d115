"""``python -m readout.evaluate``: end to end on tiny shards, resuming, rank splits, shipped configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from readout.backbones import load_classifier
from readout.evaluation.cli import main, parse_config
from readout.evaluation.config import resolve_baseline
from readout.evaluation.results import compute_results
from readout.evaluation.runner import Evaluation, ensure_synthetic, in_subset

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "eval").glob("*.yaml"))
#: The benchmark tables; the other shipped config records how the per-sample layer was chosen.
BENCHMARKS = {"synthetic", "imagenet-resnet50", "imagenet-vgg16"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(tmp_path: Path, classifier: str, methods: str, extra: list[str] | None = None) -> list[str]:
    """A run over 8 synthetic 64-px images in 2 shards that the command writes itself."""
    return [
        f"--out={tmp_path / 'out'}",
        f"--classifier.name={classifier}",
        f"--data.shards={tmp_path / 'shards'}",
        "--data.batch_size=4",
        "--data.synthetic={n: 8, size: 64, seed: 4250, shard_size: 4}",
        f"--statistics.cache={tmp_path / 'stats'}",
        "--statistics.samples=8",
        "--degradation.tiles=[32, 64]",
        "--sensitivity={fraction: 0.5, tile: 32, points: 3, num_masks: 4}",
        "--randomisation={fraction: 0.3, methods: [Saliency]}",
        "--plot_images=2",
        "--methods",
        methods,
        *(extra or []),
    ]


METHODS = (
    "[{name: Saliency, method: saliency}, {name: Occlusion-32, method: occlusion, options: {window: 32}},"
    " {name: Grad-CAM, method: grad-cam}, {name: Random, method: random}]"
)


def test_subsets_depend_on_the_key_alone():
    keys = [f"k{i}" for i in range(2000)]
    chosen = [key for key in keys if in_subset(key, 0.1, "a")]
    assert 150 < len(chosen) < 250
    assert chosen == [key for key in reversed(keys) if in_subset(key, 0.1, "a")][::-1]
    assert all(in_subset(key, 1.0, "a") for key in keys[:10])
    assert not any(in_subset(key, 0.0, "a") for key in keys[:10])


def test_cli_end_to_end_then_rerun_reuses_every_shard(tmp_path, classifier_path, monkeypatch):
    methods = METHODS[:-1] + ", {name: PS, method: per-sample, options: {steps: 1, copies: 2}}]"
    results = main(tiny_args(tmp_path, classifier_path, methods))
    out = tmp_path / "out"
    for name in ["results.json", "results.md", "degradation.png", "sensitivity-n.png"]:
        assert (out / name).is_file(), name
    assert {"randomisation.png", "heatmaps.png"} <= set(results["plots"])
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["rows"]) == ["Saliency", "Occlusion-32", "Grad-CAM", "Random", "PS"]
    random_row = saved["rows"]["Random"]
    assert random_row["images"] == 8 and random_row["localisation"]["box_ratio_count"] > 0
    assert random_row["degradation-32"]["count"] == 8
    assert not math.isnan(saved["rows"]["Occlusion-32"]["degradation-32"]["score"])
    assert "randomisation" in saved["rows"]["Saliency"] and "randomisation" not in random_row
    table = (out / "results.md").read_text()
    assert "| Occlusion-32 |" in table and "deg. 32x32 px" in table
    files = sorted((out / "cache").rglob("*.safetensors"))
    assert len(files) == 5 * 2
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_attribution(*args, **kwargs):
        raise AssertionError("a cached (method, shard) was recomputed")

    monkeypatch.setattr(Evaluation, "attributor", no_attribution)
    again = main(tiny_args(tmp_path, classifier_path, methods))
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(results["rows"], sort_keys=True)


def test_a_changed_setting_is_not_taken_from_the_cache(tmp_path, classifier_path):
    rows = "[{name: Saliency, method: saliency}, {name: Random, method: random%s}]"
    main(tiny_args(tmp_path, classifier_path, rows % ""))
    evaluation = Evaluation(parse_config(tiny_args(tmp_path, classifier_path, rows % ", options: {seed: 1}")))
    saliency, random_row = evaluation.rows
    shard = evaluation.shards.urls[0]
    assert evaluation.cache_file(saliency, shard).is_file()
    assert not evaluation.cache_file(random_row, shard).is_file()


@pytest.mark.parametrize("images", [8, 7], ids=["even", "uneven"])
def test_two_ranks_give_the_results_of_one(tmp_path, classifier_path, images):
    # 7 images in shards of 4 and 3: the ranks get 4 and 3, and one rank's last batch is short.
    extra = ["--plot_images=0", f"--data.synthetic={{n: {images}, size: 64, seed: 4250, shard_size: 4}}"]
    single = parse_config(tiny_args(tmp_path / "one", classifier_path, METHODS, extra))
    ensure_synthetic(single.data)
    one = Evaluation(single, progress=False)
    expected = compute_results(one, one.run())
    assert expected["Random"]["images"] == images
    split = parse_config(tiny_args(tmp_path / "one", classifier_path, METHODS, extra))
    split.out = str(tmp_path / "two")
    ranks = [Evaluation(split, rank, 2, progress=False) for rank in range(2)]
    totals = [evaluation.run() for evaluation in ranks]
    assert all(evaluation.calls[name] > 0 for evaluation in ranks for name in evaluation.calls)
    for name, metrics in totals[0].items():
        metrics.merge(totals[1][name])
    merged = compute_results(ranks[0], totals[0])
    for name, row in expected.items():
        for metric in [
            "localisation",
            "degradation-32",
            "degradation-64",
            "sensitivity",
            "randomisation",
            "paired",
        ]:
            if metric in row:
                assert _close(row[metric], merged[name][metric]), (name, metric)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, str):
        return a == b
    return a == pytest.approx(b, rel=1e-5, abs=1e-6)  # float32 maps of other batch shapes round apart


def test_rows_are_compared_with_the_reference_image_by_image(tmp_path, classifier_path):
    rows = (
        "[{name: Random, method: random}, {name: Saliency, method: saliency},"
        " {name: Random again, method: random}]"
    )
    extra = ["--sensitivity.fraction=0", "--randomisation.fraction=0", "--reference=Random"]
    results = main(tiny_args(tmp_path, classifier_path, rows, extra))["rows"]
    assert results["Random"]["paired"] == {"reference": "Random"}
    same = results["Random again"]["paired"]
    for score in ["box_ratio", "mask_ratio", "degradation-32", "degradation-64"]:
        assert same[score]["mean"] == 0.0 and same[score]["se"] == 0.0, score
    saliency, random_row = results["Saliency"], results["Random"]
    paired = saliency["paired"]
    # Both rows score the same images, so the mean difference is the difference of the means.
    assert paired["box_ratio"]["count"] == random_row["localisation"]["box_ratio_count"]
    assert paired["box_ratio"]["mean"] == pytest.approx(
        saliency["localisation"]["box_ratio"] - random_row["localisation"]["box_ratio"]
    )
    assert paired["degradation-32"]["mean"] == pytest.approx(
        saliency["degradation-32"]["score"] - random_row["degradation-32"]["score"]
    )
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Paired differences to **Random**" in table and "| Random again | +0.000 ± 0.000 |" in table
    with pytest.raises(ValueError, match="reference"):
        parse_config(tiny_args(tmp_path, classifier_path, rows, ["--reference=Nobody"]))


def test_every_eval_config_is_shipped():
    assert {c.stem for c in CONFIGS} == BENCHMARKS | {
        "synthetic-layer",
        "resnet18-synthetic",
        "resnet18-select",
        "synthetic-224-select",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_shipped_config_parses_through_the_cli(config):
    parsed = parse_config(["--config", str(config)])
    names = [spec.name for spec in parsed.methods]
    if config.stem == "resnet18-synthetic":  # the second architecture: readout against Per-Sample
        methods = [spec.method for spec in parsed.methods]
        assert methods == ["random", "grad-cam", "per-sample", "per-sample", "readout", "readout"]
        assert parsed.reference == "Readout β=3/k"
        return
    if config.stem == "resnet18-select":  # choosing Per-Sample's settings on validation images
        assert {spec.method for spec in parsed.methods} == {"per-sample"}
        return
    if config.stem not in BENCHMARKS:
        assert all(spec.method == "per-sample" for spec in parsed.methods[:-1])
        return
    methods = {spec.method for spec in parsed.methods}
    assert {"per-sample", "readout", "grad-cam", "saliency", "occlusion", "random"} <= methods
    assert any(name.startswith("Per-Sample β=10/k") for name in names)


def test_bad_configs_are_refused_with_the_field_named(tmp_path, classifier_path):
    with pytest.raises((ValueError, SystemExit)):
        parse_config(
            tiny_args(tmp_path, classifier_path, "[{name: A, method: saliency}, {name: A, method: lrp}]")
        )


def _gloo_rank(rank: int, world_size: int, store: str, args: list[str]) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        main(args)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_gloo_two_processes_write_the_results_of_one(tmp_path, classifier_path):
    import torch.multiprocessing as mp

    methods = (
        "[{name: Saliency, method: saliency}, {name: Occlusion-32, method: occlusion, options: {window: 32}}]"
    )
    single = main(tiny_args(tmp_path / "one", classifier_path, methods))
    args = tiny_args(tmp_path / "one", classifier_path, methods, [f"--out={tmp_path / 'two'}"])
    mp.spawn(_gloo_rank, args=(2, str(tmp_path / "store"), args), nprocs=2, join=True)
    both = json.loads((tmp_path / "two" / "results.json").read_text())
    assert both["world_size"] == 2
    for name, row in single["rows"].items():
        for metric in ["localisation", "degradation-32", "sensitivity", "randomisation"]:
            if metric in row:
                assert _close(row[metric], both["rows"][name][metric]), (name, metric)
    assert "randomisation" in both["rows"]["Saliency"]


def test_an_interrupted_run_recomputes_only_the_missing_pairs(tmp_path, classifier_path, monkeypatch):
    # As after a kill: one (row, shard) cache file is missing, the others are kept.
    rows = "[{name: Saliency, method: saliency}, {name: Random, method: random}]"
    first = main(tiny_args(tmp_path, classifier_path, rows))
    evaluation = Evaluation(parse_config(tiny_args(tmp_path, classifier_path, rows)), progress=False)
    saliency, random_row = evaluation.rows
    lost = evaluation.cache_file(random_row, evaluation.shards.urls[1])
    lost.unlink()
    built = []
    original = Evaluation.attributor

    def counting(self, row):
        built.append(row.spec.name)
        return original(self, row)

    monkeypatch.setattr(Evaluation, "attributor", counting)
    again = main(tiny_args(tmp_path, classifier_path, rows))
    assert lost.is_file()
    assert set(built) == {"Random"}

    def scores(results):  # the recomputed pair was timed anew
        timing = {"seconds_per_image", "metric_seconds"}
        return {
            name: {k: v for k, v in row.items() if k not in timing} for name, row in results["rows"].items()
        }

    assert json.dumps(scores(again), sort_keys=True) == json.dumps(scores(first), sort_keys=True)


def test_baselines_are_config_values(tmp_path, classifier_path):
    config = parse_config(tiny_args(tmp_path, classifier_path, METHODS, ["--degradation.baseline=0.3"]))
    classifier = load_classifier(classifier_path)
    assert config.degradation.baseline == 0.3 and resolve_baseline(0.3, classifier) == 0.3
    assert config.sensitivity.baseline == "normalised-zero"
    assert torch.equal(resolve_baseline("normalised-zero", classifier), classifier.mean)
    assert resolve_baseline("mean", classifier) == "mean"
    with pytest.raises((ValueError, SystemExit)):
        parse_config(tiny_args(tmp_path, classifier_path, METHODS, ["--degradation.baseline=grey"]))
