"""Corrupt data: truncated shards, corrupt images, samples without ``cls`` and a shard that disappears
mid-run are skipped and counted per shard; past ``data.max_bad_share`` the run stops naming the worst."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from helpers import assert_same_readout_weights, fit_args, step_processes

from readout.data.shards import ShardDataset, ShardHealth, make_loader
from readout.data.synthetic import generate, to_record, write_shards
from readout.data.transforms import eval_transform
from readout.training.faults import BadDataError
from readout.training.fit import main as fit

pytestmark = pytest.mark.usefixtures("one_thread")
TRANSFORM = eval_transform(64, 64)


def write_tar(path: Path, records: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for record in records:
            writer.write(record)
    return path


def corrupt_shard(path: Path, seed: int = 5, good: int = 4) -> Path:
    """8 samples: ``good`` whole ones, then alternately a PNG cut short and a sample without ``cls``."""
    records = [to_record(sample) for sample in generate(8, 64, seed)]
    for i, record in enumerate(records[good:]):
        if i % 2:
            del record["cls"]
        else:
            record["png"] = record["png"][:200]
    return write_tar(path, records)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good-0.tar, good-1.tar (8 whole samples each), corrupt.tar (4 whole, 2 cut, 2 without cls) and
    truncated.tar (the first 40% of a good shard's bytes)."""
    out = tmp_path_factory.mktemp("mixed")
    write_shards(out / "synthetic", n=24, size=64, seed=0, shard_size=8)
    for i in range(2):
        shutil.copy(out / "synthetic" / f"synthetic-00000{i}.tar", out / f"good-{i}.tar")
    corrupt_shard(out / "corrupt.tar")
    data = (out / "synthetic" / "synthetic-000002.tar").read_bytes()
    (out / "truncated.tar").write_bytes(data[: int(len(data) * 0.4)])
    return out


def test_each_kind_of_corruption_is_skipped_and_counted_by_shard(mixed):
    """Two loader workers: the counts reach the main process from both."""
    loader = make_loader(str(mixed / "*.tar"), "eval", 4, num_workers=2, transform=TRANSFORM)
    keys = [key for batch in loader for key in batch["key"]]
    health = loader.dataset.health()
    assert health.reasons["unreadable_image"] == 2 and health.reasons["missing_cls"] == 2
    assert health.reasons["bad_shard"] >= 1  # the cut shard: its tar error (and a sample cut in two)
    assert set(health.by_shard) == {str(mixed / "corrupt.tar"), str(mixed / "truncated.tar")}
    assert health.by_shard[str(mixed / "corrupt.tar")] == 4
    assert health.good == len(keys) and 20 <= len(keys) < 24  # 8 + 8 + 4 + what the cut shard held whole
    assert health.bad == sum(health.reasons.values()) == sum(health.by_shard.values())


@pytest.mark.fault(
    "a shard vanishes mid-epoch", "training", "skipped, counted and named in a warning; the epoch goes on"
)
def test_a_shard_that_disappears_mid_run_is_skipped_and_named(mixed, tmp_path, fault_result):
    for name in ("good-0.tar", "good-1.tar"):
        shutil.copy(mixed / name, tmp_path / name)
    dataset = ShardDataset(
        str(tmp_path / "*.tar"), "train", 4, TRANSFORM, batches_per_epoch=8, shuffle_buffer=4
    )
    (tmp_path / "good-1.tar").unlink()  # after the shards were listed and checked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(dataset)) == 8
    health = dataset.health()
    gone = str(tmp_path / "good-1.tar")
    assert health.by_shard[gone] == health.reasons["bad_shard"] >= 1
    assert any(gone in str(w.message) for w in caught)
    assert set(health.by_shard) == {gone} and health.good == 8 * 4
    fault_result.update(steps_lost=0)


def test_the_share_is_judged_once_enough_samples_were_read():
    urls = {
        "s3://data/train-000007.tar": 30,
        "s3://data/train-000002.tar": 4,
        "s3://data/train-000003.tar": 1,
    }
    health = ShardHealth(good=965, bad=35, reasons={"unreadable_image": 34, "bad_shard": 1}, by_shard=urls)
    message = health.verdict(0.01)
    assert message is not None
    assert message.startswith("35 of 1000 samples read (3.5%) were bad, more than data.max_bad_share = 0.01")
    assert "Worst shards: s3://data/train-000007.tar (30 bad), s3://data/train-000002.tar (4 bad)" in message
    assert "bad_shard 1, unreadable_image 34" in message
    early = ShardHealth(good=400, bad=35, reasons={"unreadable_image": 35}, by_shard=urls)
    assert early.verdict(0.01) is None  # 435 < 10 / 1% samples: not judged yet
    assert early.verdict(0.05) is not None  # 435 >= 200 and 8% > 5%
    assert health.verdict(0.05) is None and health.verdict(1.0) is None
    one = ShardHealth(good=0, bad=1, reasons={"missing_cls": 1}, by_shard={})
    assert one.verdict(0.0) is not None  # no tolerance at all: the first bad sample stops the run


@pytest.fixture(scope="module")
def half_bad(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a good shard and 3 shards of 8 samples of which 6 are bad."""
    out = tmp_path_factory.mktemp("half-bad")
    shutil.copy(mixed / "good-0.tar", out / "good-0.tar")
    for i in range(3):
        corrupt_shard(out / f"bad-{i}.tar", seed=6 + i, good=2)
    return out


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("data/bad_samples")]


def test_bad_samples_are_logged_and_past_the_share_the_run_stops_naming_the_worst_shard(
    half_bad, tmp_path, no_slurm
):
    below = fit(fit_args(half_bad, tmp_path / "below"))  # default 1%: judged after 1000 samples
    assert below.trainer.global_step == 6
    logged = metrics(tmp_path / "below")
    assert float(logged[-1]["data/bad_samples"]) > 0 and float(logged[-1]["data/bad_share"]) > 0

    worst = rf"more than data\.max_bad_share = 0\.25\. Worst shards: {half_bad}/bad-\d\.tar \(\d+ bad\)"
    with pytest.raises(BadDataError, match=worst):
        fit([*fit_args(half_bad, tmp_path / "past", max_steps=40), "--data.max_bad_share", "0.25"])
    shares = [float(row["data/bad_share"]) for row in metrics(tmp_path / "past")]
    assert shares and shares[-1] > 0.25


class KillLoaderWorkersAt(pl.Callback):
    """SIGKILLs this process's children (the data loader's workers) as step ``at`` starts, as the kernel's
    OOM killer would."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.at or self.done:
            return
        self.done = True
        for worker in step_processes(os.getpid())[1:]:
            os.kill(worker, signal.SIGKILL)
        time.sleep(2)  # torch's SIGCHLD handler raises here, or at the next batch


@pytest.mark.fault(
    "a data loader worker killed (SIGKILL)",
    "training",
    "the run stops with advice (OOM killer, fewer workers); the last checkpoint resumes it",
)
def test_a_killed_loader_worker_stops_the_run_with_advice_and_the_last_checkpoint_resumes_it(
    uninterrupted,
    shards,
    tmp_path,
    capsys,
    no_slurm,
    fault_result,
):
    run = tmp_path / "run"
    kill = {"class_path": f"{__name__}.KillLoaderWorkersAt", "init_args": {"at": 3}}
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid"):
        fit([*fit_args(shards, run, callbacks=[kill]), "--data.num_workers", "1"])
    err = capsys.readouterr().err
    assert "a data loader worker died" in err and "OOM killer" in err and "--ckpt_path last" in err, err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    second = fit([*fit_args(shards, run), "--data.num_workers", "1", "--ckpt_path", "last"])
    assert second.trainer.global_step == 6  # step 3 again: 1 step lost
    assert_same_readout_weights(second, uninterrupted)
    fault_result.update(steps_lost=1, same_weights=True)
