"""Distilling the readout from Per-Sample maps: the teacher file, its crops, the loss and the fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import fit_with_tensorboard, tiny_config, write_config
from safetensors.torch import save_file
from torchvision.transforms import v2

import readout.tools.teacher
import readout.training.teacher
from readout.data.format import ShardSample
from readout.data.resume import ResumableShards
from readout.data.shards import make_loader
from readout.data.teacher import TeacherMaps
from readout.data.transforms import train_transform, transform_sample
from readout.readout_bottleneck import distill_loss
from readout.training.datamodule import ReadoutDataModule
from readout.training.fit import main as fit
from readout.training.module import ReadoutModule


def make_teacher(shards: Path, out: Path, *extra: str) -> Path:
    readout.tools.teacher.main(
        ["--shards", str(shards), "--layer", "block2", "--out", str(out), "--batch-size", "8",
         "--estimate-samples", "16", "--threads", "1", *extra]
    )  # fmt: skip
    return out


@pytest.fixture
def teacher_file(tiny_shards: Path, tmp_path: Path) -> Path:
    return make_teacher(tiny_shards, tmp_path / "teacher.safetensors")


def test_the_teacher_file_holds_a_per_sample_map_for_every_training_sample(teacher_file, tiny_shards):
    maps = TeacherMaps(teacher_file)
    keys = [key for batch in make_loader(str(tiny_shards), "eval", 8, 0) for key in batch["key"]]
    assert maps.info.count == 24 and maps.info.grid == (16, 16)  # 32-px images fitted at 64 px, stride 4
    assert maps.info.layer == "block2" and maps.info.beta == 10.0
    assert not Path(f"{teacher_file}.partial").exists()
    values = np.stack([maps[key] for key in maps.index])
    assert np.isfinite(values).all() and (values >= 0).all() and values.sum() > 0
    assert sorted(maps.index) == sorted(keys) and len(keys) == 24
    with pytest.raises(KeyError, match="other shards"):
        maps["not-a-key"]


def test_a_teacher_run_stopped_part_way_resumes_to_the_same_file(tiny_shards, tmp_path, monkeypatch):
    whole = TeacherMaps(make_teacher(tiny_shards, tmp_path / "whole.safetensors"))
    calls = {"n": 0}
    explain = readout.training.teacher.PerSample.explain

    def stopping(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return explain(self, *args, **kwargs)

    monkeypatch.setattr(readout.training.teacher.PerSample, "explain", stopping)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        make_teacher(tiny_shards, out)
    assert not out.exists() and len(list(Path(f"{out}.partial").glob("chunk-*.safetensors"))) == 1
    with pytest.raises(ValueError, match="other settings"):
        make_teacher(tiny_shards, out, "--beta", "1")
    monkeypatch.setattr(readout.training.teacher.PerSample, "explain", explain)
    resumed = TeacherMaps(make_teacher(tiny_shards, out))
    for key in whole.index:
        np.testing.assert_array_equal(resumed[key], whole[key])


def test_teacher_files_are_checked_on_opening(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m readout.tools.teacher"):
        TeacherMaps(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"maps": torch.zeros(2, 4, 4)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a teacher file"):
        TeacherMaps(other)
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a teacher file"):
        TeacherMaps(tmp_path / "garbage.safetensors")


def test_a_teacher_map_is_cropped_and_flipped_as_its_image():
    """A map equal to the image's red channel stays equal to it through a random crop and a flip."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sample = ShardSample("k", image, 0, "", [])
    teacher = image[..., 0].astype(np.float32) / 255
    for seed in range(4):
        torch.manual_seed(seed)
        element = transform_sample(sample, train_transform(24, scale=(0.3, 1.0), flip=0.5), teacher)
        assert element["teacher"].shape == (1, 24, 24)
        torch.testing.assert_close(element["teacher"][0], element["image"][0], atol=2 / 255, rtol=0)
    coarse = transform_sample(sample, v2.Compose([v2.ToDtype(torch.float32, scale=True)]), teacher[::4, ::4])
    assert coarse["teacher"].shape == (1, 32, 32)  # a map at the bottleneck's grid covers the canvas


def test_passed_over_samples_need_no_teacher_map(teacher_file, tiny_shards):
    dataset = ResumableShards(
        str(tiny_shards), "train", 4, train_transform(32), seed=0, batches_per_epoch=4,
        teacher=TeacherMaps(teacher_file),
    )  # fmt: skip
    first = next(iter(dataset))
    assert first["teacher"].shape == (4, 1, 32, 32)
    dataset.skip_batches = 1
    dataset.set_epoch(0)
    resumed = list(dataset)
    dataset.set_epoch(0)
    whole = list(dataset)
    assert len(resumed) == 3
    for a, b in zip(resumed, whole[1:], strict=True):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["teacher"], b["teacher"])


def test_distill_loss_is_zero_when_the_readout_places_its_information_as_the_teacher():
    teacher = torch.rand(3, 1, 16, 16)
    kl = torch.nn.functional.avg_pool2d(teacher, 4).repeat(1, 4, 1, 1) * 7.0  # (3, 4, 4, 4), ∝ teacher
    assert distill_loss(kl, teacher).item() == pytest.approx(0.0, abs=1e-5)
    student = torch.rand(3, 4, 4, 4, requires_grad=True)
    loss = distill_loss(student, teacher)
    loss.backward()
    assert loss.item() > 0.01 and student.grad is not None and student.grad.abs().sum() > 0


def shipped_config(shards: Path, teacher: Path | None, **model: Any) -> dict:
    config = tiny_config(shards, max_steps=3, limit_val_batches=0)
    config["model"].update(weights="IMAGENET1K_V1", **model)
    if teacher is not None:
        config["data"]["teacher"] = str(teacher)
    return config


def test_a_distilled_fit_logs_its_term(teacher_file, tiny_shards, tmp_path, monkeypatch):
    config = shipped_config(tiny_shards, teacher_file, distill_weight=1.0)
    cli, events = fit_with_tensorboard(config, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 3
    distill = [e.value for e in events.Scalars("train/distill")]
    assert len(distill) == 3 and all(0 < value < 10 for value in distill)
    assert len(events.Scalars("train/loss")) == 3


def test_distillation_without_a_teacher_or_with_another_classifiers_is_refused(
    teacher_file, tiny_shards, tmp_path
):
    config = shipped_config(tiny_shards, None, distill_weight=1.0)
    with pytest.raises(ValueError, match="data.teacher"):
        fit(["--config", str(write_config(tmp_path / "a.yaml", config)), "--run_dir", str(tmp_path / "a")])
    config = shipped_config(tiny_shards, teacher_file, distill_weight=1.0)
    config["model"]["weights"] = None  # a random init: not the classifier the maps were made with
    with pytest.raises(ValueError, match="fingerprint"):
        fit(["--config", str(write_config(tmp_path / "b.yaml", config)), "--run_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="distill_weight"):
        ReadoutModule(classifier="synthetic-cnn", weights=None, distill_weight=-1.0)
    with pytest.raises(FileNotFoundError, match="data.teacher"):
        ReadoutDataModule(str(tiny_shards), teacher=str(tmp_path / "none.safetensors"))
