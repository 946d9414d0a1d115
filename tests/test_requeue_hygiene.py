"""Requeue hygiene: old hpc_ckpt files are pruned, each requeue is logged, and a job that made no
progress since its last requeue is not requeued again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import FAKE_SLURM, fit_args

from readout.training.faults import (
    REQUEUE_LOG,
    Preemption,
    no_progress,
    prune_signal_checkpoints,
    read_requeues,
    record_requeue,
)
from readout.training.fit import main as fit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_the_newest_signal_checkpoints_are_kept(tmp_path):
    for n in (1, 2, 9, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    removed = prune_signal_checkpoints(str(tmp_path), keep=2)
    assert sorted(Path(p).name for p in removed) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    # numeric order, not the names': 10 is newer than 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_10.ckpt", "hpc_ckpt_9.ckpt", "last.ckpt"]
    assert prune_signal_checkpoints(str(tmp_path / "missing"), keep=1) == []
    with pytest.raises(ValueError, match=">= 1"):
        prune_signal_checkpoints(str(tmp_path), keep=0)
    with pytest.raises(ValueError, match=">= 1"):
        Preemption(keep_signal_checkpoints=0)


def test_signal_checkpoints_are_pruned_in_an_fsspec_run_directory():
    fs = fsspec.filesystem("memory")
    for n in (3, 4, 5):
        fs.pipe(f"/prune-run/hpc_ckpt_{n}.ckpt", b"x")
    prune_signal_checkpoints("memory://prune-run", keep=1)
    assert [Path(p).name for p in fs.ls("/prune-run", detail=False)] == ["hpc_ckpt_5.ckpt"]
    fs.rm("/prune-run", recursive=True)


def test_the_requeue_log_survives_a_torn_line_and_says_when_no_step_was_made(tmp_path):
    root = str(tmp_path)
    assert read_requeues(root) == [] and no_progress(root, 0) is None
    record_requeue(root, {"job": "7", "step": 40, "time": "t0", "requeued": True})
    with (tmp_path / REQUEUE_LOG).open("a") as handle:
        handle.write('{"job": "7", "step": 4')  # a crash in the middle of a write
    assert [e["step"] for e in read_requeues(root)] == [40]
    assert no_progress(root, 41) is None
    message = no_progress(root, 40)
    assert message is not None and "step 40" in message and "job 7" in message and REQUEUE_LOG in message
    record_requeue(root, {"job": "7", "step": 40, "time": "t1", "requeued": False})
    assert [e["requeued"] for e in read_requeues(root)] == [True, False]
    assert no_progress(root, 40) is not None  # a refused attempt does not reset the count


def test_a_job_is_requeued_and_logged_until_it_stops_making_progress(tmp_path, monkeypatch):
    log = tmp_path / "scontrol.log"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SCONTROL_LOG", str(log))
    monkeypatch.setenv("SLURM_JOB_ID", "5150")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    preemption = Preemption()
    preemption.received = "SIGUSR1"
    root = str(tmp_path / "run")
    assert preemption._requeue(root, 12, f"{root}/hpc_ckpt_1.ckpt") == "5150"
    with pytest.warns(UserWarning, match="no progress"):
        assert preemption._requeue(root, 12, f"{root}/hpc_ckpt_2.ckpt") is None
    assert preemption._requeue(root, 13, f"{root}/hpc_ckpt_3.ckpt") == "5150"
    assert log.read_text() == "requeue 5150\nrequeue 5150\n"
    entries = read_requeues(root)
    assert [(e["step"], e["requeued"]) for e in entries] == [(12, True), (12, False), (13, True)]
    assert all(e["job"] == "5150" and e["signal"] == "SIGUSR1" and e["restart"] == 1 for e in entries)
    assert json.loads((tmp_path / "run" / REQUEUE_LOG).read_text().splitlines()[0])["time"]


def test_a_run_preempted_twice_keeps_only_the_newest_signal_checkpoints(shards, tmp_path, no_slurm, recwarn):
    run = tmp_path / "run"

    def signalled_at(step: int) -> list[str]:
        at = {
            "class_path": "helpers.SignalAt",
            "init_args": {"signal_name": "SIGTERM", "at": step},
        }
        return [
            *fit_args(shards, run, callbacks=[at]),
            "--ckpt_path",
            "last",
            "--keep_signal_checkpoints",
            "1",
        ]

    assert fit(signalled_at(1)).trainer.global_step == 2
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert fit(signalled_at(3)).trainer.global_step == 4
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_2.ckpt"]
    assert not (run / REQUEUE_LOG).exists()  # outside SLURM nothing is requeued
    # resumed mid-epoch twice, and Lightning knows the loader resumes (readout.data.resume.TrainLoader)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_the_last_checkpoint_is_of_the_final_step(shards, tmp_path, no_slurm):
    """6 steps with a checkpoint every 4: ModelCheckpoint alone leaves last.ckpt at step 4."""
    run = tmp_path / "run"
    cli = fit(fit_args(shards, run, every=4))
    assert cli.trainer.global_step == 6
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert all(s["step"] == 6 for s in last["optimizer_states"][0]["state"].values())
