"""readout.fit: the run directory, ``--ckpt_path last`` and an exact resume.

``tiny_config`` (helpers.py): a run of a random-init synthetic-cnn on 64-px shards that takes a few
seconds.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from helpers import REPO, assert_same_readout_weights, resnet50_args, tiny_config, write_config
from jsonargparse import ArgumentParser, dict_to_namespace

from readout.data.synthetic import write_shards
from readout.readout_bottleneck import ReadoutBottleneck
from readout.training.datamodule import ReadoutDataModule
from readout.training.fit import checkpoint_to_resume, move_run, resolve_checkpoint, resume_candidates
from readout.training.fit import main as fit
from readout.training.module import ReadoutModule


@pytest.fixture(scope="module")
def shards64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "shards"
    write_shards(out, n=24, size=64, seed=0, shard_size=8)
    return out


# ------------------------------------------------------------------------------------------------------
# --ckpt_path last


def touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_resolve_checkpoint_passes_paths_through_and_starts_fresh_without_checkpoints(tmp_path):
    assert resolve_checkpoint(None, str(tmp_path)) is None
    assert resolve_checkpoint("some/file.ckpt", str(tmp_path)) == "some/file.ckpt"
    assert resolve_checkpoint("last", str(tmp_path)) is None
    assert resolve_checkpoint("last", str(tmp_path / "missing")) is None


def test_resolve_checkpoint_takes_the_newest_of_last_and_hpc(tmp_path):
    last = touch(tmp_path / "checkpoints" / "last.ckpt", 2000)
    touch(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt", 3000)  # not a candidate: not last*
    hpc = touch(tmp_path / "hpc_ckpt_1.ckpt", 1000)
    assert resolve_checkpoint("last", str(tmp_path)) == str(last)
    os.utime(hpc, (2500, 2500))
    assert resolve_checkpoint("last", str(tmp_path)) == str(hpc)
    newer_last = touch(tmp_path / "checkpoints" / "last-v1.ckpt", 2600)
    assert resolve_checkpoint("last", str(tmp_path)) == str(newer_last)
    hpc2 = touch(tmp_path / "hpc_ckpt_2.ckpt", 2600)  # a tie on a coarse clock: the signal's is newer
    assert resolve_checkpoint("last", str(tmp_path)) == str(hpc2)


@pytest.fixture
def memory_run(request: pytest.FixtureRequest):
    """A run directory ``memory://<test name>`` in fsspec's in-process memory file system, removed after."""
    fs = fsspec.filesystem("memory")
    root = f"/{request.node.name.replace('[', '-').replace(']', '')}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(fs, path: str, payload: bytes, mtime: float) -> str:
    """Writes ``payload`` to ``path`` of the memory file system and dates it at ``mtime``."""
    fs.pipe(path, payload)
    fs.store[path].modified = datetime.fromtimestamp(mtime, UTC)
    return f"memory://{path}"


def test_resume_candidates_of_an_fsspec_url_are_listed_through_fsspec_newest_first(memory_run):
    """Path.glob found nothing under ``s3://`` or ``memory://``: ``--ckpt_path last`` started over."""
    fs, root = memory_run
    last = put(fs, f"{root}/checkpoints/last.ckpt", b"x", 2000)
    top_k = put(fs, f"{root}/checkpoints/epoch=0-step=3.ckpt", b"x", 3000)  # a fallback only
    hpc = put(fs, f"{root}/hpc_ckpt_1.ckpt", b"x", 1000)
    url = f"memory://{root}"
    assert resume_candidates(url) == [last, hpc]
    assert resume_candidates(url, fallbacks=True) == [last, hpc, top_k]
    assert resolve_checkpoint("last", url) == last
    tie = put(fs, f"{root}/hpc_ckpt_2.ckpt", b"x", 2000)  # a tie: the signal's is written after
    assert resume_candidates(url) == [tie, last, hpc]
    assert resume_candidates(f"memory://{root}/missing") == []


def test_checkpoint_to_resume_of_an_fsspec_url_falls_back_past_a_corrupt_checkpoint(memory_run):
    fs, root = memory_run
    torch.manual_seed(0)
    model = ReadoutModule(classifier="synthetic-cnn", weights=None, estimate_samples=8)
    checkpoint = {
        "state_dict": {},
        "optimizer_states": [],
        "loops": {},
        "readout_classifier": {"name": "synthetic-cnn", "fingerprint": model.fingerprint},
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    good = put(fs, f"{root}/checkpoints/last.ckpt", buffer.getvalue(), 1000)
    corrupt = put(fs, f"{root}/hpc_ckpt_1.ckpt", buffer.getvalue()[:100], 2000)  # truncated
    with pytest.warns(UserWarning, match=rf"cannot resume from {corrupt}: .*falling back to {good}"):
        assert checkpoint_to_resume("last", f"memory://{root}", model) == good


def test_move_run_rebases_what_lies_under_the_old_run_directory():
    config = dict_to_namespace(yaml.safe_load((REPO / "configs" / "resnet50.yaml").read_text()))
    move_run(config, "/scratch/r50-7")
    assert config.trainer.default_root_dir == "/scratch/r50-7"
    assert config.trainer.logger.init_args.save_dir == "/scratch/r50-7"
    assert config.trainer.callbacks[0].init_args.dirpath == "/scratch/r50-7/checkpoints"
    assert config.export_dir == "/scratch/r50-7/export"

    demo = dict_to_namespace(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()))
    move_run(demo, "elsewhere")
    assert demo.trainer.callbacks[0].init_args.dirpath == "elsewhere/checkpoints"
    assert demo.export_dir == "checkpoints/readout-demo"  # not under runs/demo: stays

    move_run(config, "s3://bucket/r50-8")  # pathlib would make it s3:/bucket/...
    assert config.trainer.logger.init_args.save_dir == "s3://bucket/r50-8"
    assert config.trainer.callbacks[0].init_args.dirpath == "s3://bucket/r50-8/checkpoints"
    assert config.export_dir == "s3://bucket/r50-8/export"


def test_validation_can_be_turned_off_from_the_command_line(shards64):
    parser = ArgumentParser()
    parser.add_class_arguments(ReadoutDataModule, "data")
    parsed = parser.parse_args(["--data.train_shards", str(shards64), "--data.val_shards", "null"])
    assert parsed.data.val_shards is None


# ------------------------------------------------------------------------------------------------------
# Resuming


@pytest.fixture(scope="module")
def uninterrupted(shards64, tmp_path_factory):
    """6 steps in one run (4 batches per epoch): the reference of the resume tests."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root / "tiny.yaml", tiny_config(shards64))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            patch.delenv(key)
        return fit(["--config", str(config), "--run_dir", str(root / "run")])


@pytest.mark.parametrize(
    "stop_at",
    [3, pytest.param(4, marks=pytest.mark.slow, id="epoch-end")],
    ids=lambda s: {3: "mid-epoch"}.get(s, str(s)),
)
def test_resume_gives_the_weights_of_an_uninterrupted_run(
    stop_at, uninterrupted, shards64, tmp_path, monkeypatch, no_slurm
):
    """6 steps at once vs ``stop_at`` steps + the rest resumed from last.ckpt. Mid-epoch (step 3 of 4)
    the resumed run must skip the batches done; at the epoch's end it must start the next epoch's data;
    either way it goes on into the next epoch, so step, Adam's state, μ/σ and the data all count."""
    monkeypatch.chdir(tmp_path)  # the config's relative paths must all move into --run_dir
    config = tiny_config(shards64)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = stop_at
    config_path = str(write_config(tmp_path / "tiny.yaml", config))
    estimates = []
    estimate = ReadoutBottleneck.estimate

    def counting_estimate(self, *args, **kwargs):
        estimates.append(1)
        return estimate(self, *args, **kwargs)

    monkeypatch.setattr(ReadoutBottleneck, "estimate", counting_estimate)
    run = ["--config", config_path, "--run_dir", str(tmp_path / "run")]
    first = fit([*run, "--trainer.max_steps", str(stop_at)])
    assert len(estimates) == 1
    second = fit([*run, "--ckpt_path", "last"])
    assert len(estimates) == 1, "the resumed run estimated μ/σ again instead of restoring them"
    assert not (tmp_path / "runs").exists()

    assert first.trainer.global_step == stop_at and second.trainer.global_step == 6
    assert second.trainer.current_epoch == uninterrupted.trainer.current_epoch
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert all(s["step"] == 6 for s in checkpoint["optimizer_states"][0]["state"].values())
    assert_same_readout_weights(second, uninterrupted)
    statistics = second.model.attributor.statistics
    assert statistics.count.item() == 8
    torch.testing.assert_close(statistics.total, uninterrupted.model.attributor.statistics.total)
    # the bundle records how it was trained: this process's command and config, and the resume
    training = json.loads((tmp_path / "run" / "export" / "readout.json").read_text())["training"]
    assert training["command"].startswith("python -m readout.fit --config ")
    assert training["command"].endswith("--ckpt_path last") and training["steps"] == 6
    assert training["resumed_from"].endswith("last.ckpt") and training["minutes"] >= 0
    assert training["config"]["model"]["beta"] == 1.0 and training["config"]["data"]["batch_size"] == 4


def test_a_run_in_an_fsspec_url_resumes_from_its_last_checkpoint(
    uninterrupted, shards64, tmp_path, memory_run, no_slurm
):
    """3 steps, then ``--ckpt_path last`` in ``memory://``: the weights of the 6-step run, not a new run."""
    fs, root = memory_run
    config = str(write_config(tmp_path / "tiny.yaml", tiny_config(shards64)))
    run = ["--config", config, "--run_dir", f"memory://{root}"]
    fit([*run, "--trainer.max_steps", "3"])
    second = fit([*run, "--ckpt_path", "last"])
    assert second.trainer.ckpt_path == f"memory://{root}/checkpoints/last.ckpt"
    assert second.trainer.global_step == 6
    assert_same_readout_weights(second, uninterrupted)
    assert fs.isfile(f"{root}/export/readout.json") and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resnet50_config_trains_on_224_px_on_cpu(tmp_path, monkeypatch, no_slurm):
    """configs/resnet50.yaml at 224 px with random weights and fp32: 1 step of 1 image (~1 min)."""
    write_shards(tmp_path / "shards", n=2, size=224, seed=0, shard_size=1)
    monkeypatch.chdir(tmp_path)
    cli = fit(resnet50_args(tmp_path / "shards", tmp_path / "run"))
    assert cli.trainer.global_step == 1
    assert (tmp_path / "run" / "export" / "readout.json").is_file()


def test_a_run_does_not_warn_that_the_frozen_classifier_is_in_eval_mode(shards64, tmp_path, no_slurm):
    """Lightning warns on every start that modules are in eval mode; here that is the frozen classifier,
    on purpose, so readout.fit silences it."""
    path = write_config(tmp_path / "tiny.yaml", tiny_config(shards64, max_steps=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = fit(["--config", str(path), "--run_dir", str(tmp_path / "run")])
    assert cli.trainer.global_step == 1
    assert not [w for w in caught if "in eval mode" in str(w.message)], [str(w.message) for w in caught]
