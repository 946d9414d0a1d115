"""A dead or stalled peer in a two-process gloo run: the survivor says so and exits in bounded time (no
hang), and the job resumes from the last checkpoint. A SIGTERM to one rank stops both after one step.

``readout.fit --trainer.devices 2`` in a subprocess; Lightning's launcher starts rank 1 as a child with
the same command line. Rank 1 writes its process id and stops working at step 3 (its peer waits for it
in the step's collectives); the test then kills it, or lets rank 0's DDP timeout run out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import ddp_env, fit_args

from readout.training.fit import main as fit

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


class StallAt(pl.Callback):
    """On rank ``rank`` at the start of step ``at``: writes the process id to ``marker`` and sleeps."""

    def __init__(self, at: int, rank: int, marker: str) -> None:
        self.at, self.rank, self.marker = at, rank, Path(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at and trainer.global_rank == self.rank:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def start_two_ranks(
    shards: Path, tmp_path: Path, timeout: str
) -> tuple[subprocess.Popen, Path, Path, list[str]]:
    """The run, its log, the marker of rank 1 and the arguments (checkpoints every 2 steps)."""
    run, marker, log = tmp_path / "run", tmp_path / "rank1.pid", tmp_path / "out.txt"
    stall = {"class_path": f"{__name__}.StallAt", "init_args": {"at": 3, "rank": 1, "marker": str(marker)}}
    strategy = {
        "class_path": "pytorch_lightning.strategies.DDPStrategy",
        "init_args": {"timeout": timeout, "broadcast_buffers": False},
    }
    args = fit_args(shards, run, callbacks=[stall], devices=2, strategy=strategy)
    with log.open("w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "readout.fit", *args],
            env={**ddp_env(), "PYTHONPATH": str(TESTS)},
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while not marker.exists() or not marker.read_text():
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "rank 1 never reached step 3"
        time.sleep(0.05)
    return job, log, marker, args


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def resumes_from_step_2(shards: Path, tmp_path: Path) -> None:
    """The job again, on one process to spare the test a second launch, from the last checkpoint."""
    run = tmp_path / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = fit([*fit_args(shards, run), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 6
    assert (run / "export" / "readout.json").is_file()


@pytest.mark.fault(
    "a rank dies (SIGKILL)",
    "training, 2 processes",
    "the other rank exits within seconds saying how to resume; the last checkpoint resumes it",
)
@pytest.mark.ddp
def test_when_a_rank_is_killed_the_other_exits_with_a_message_and_the_job_resumes(
    shards,
    tmp_path,
    monkeypatch,
    no_slurm,
    fault_result,
):
    job, log, marker, _ = start_two_ranks(shards, tmp_path, timeout="0:05:00")
    rank1 = int(marker.read_text())
    killed = time.monotonic()
    kill(rank1)
    try:
        code = job.wait(timeout=60)  # far below the 5-minute timeout: a dead peer is noticed at once
    finally:
        kill(job.pid)
    output = log.read_text()
    assert code != 0, output[-3000:]
    # Either rank 0's next collective fails first, or Lightning's child-process observer (every 5 s)
    # ends the job first; both explain themselves (readout.training.faults.explain_observer_kills).
    assert re.search(r"rank 0 of 2 stops: (a collective operation failed|another process of this run died)",
                     output), output[-3000:]  # fmt: skip
    assert "run again with --ckpt_path last to resume" in output
    assert time.monotonic() - killed < 60
    monkeypatch.chdir(tmp_path)
    resumes_from_step_2(shards, tmp_path)
    fault_result.update(steps_lost=1)


@pytest.mark.fault(
    "a rank hangs", "training, 2 processes", "the other rank gives up after the DDP timeout, saying so"
)
@pytest.mark.ddp
@pytest.mark.slow
def test_when_a_rank_stalls_the_other_gives_up_after_the_ddp_timeout(shards, tmp_path, no_slurm):
    # The timeout also bounds the start (rank 1 must join within it): on two busy cores that takes ~10 s.
    job, log, marker, _ = start_two_ranks(shards, tmp_path, timeout="0:00:20")
    rank1 = int(marker.read_text())
    stalled = time.monotonic()
    try:
        code = job.wait(timeout=120)
    finally:
        kill(rank1)
        kill(job.pid)
    waited = time.monotonic() - stalled
    output = log.read_text()
    assert code != 0, output[-3000:]
    assert "rank 0 of 2 stops" in output and "DDP timeout (0:00:20" in output, output[-3000:]
    assert 15 < waited < 80, waited


@pytest.mark.fault(
    "SIGTERM to one rank only",
    "training, 2 processes",
    "both ranks stop after the same step; one checkpoint; exit 0",
)
@pytest.mark.ddp
def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_one_checkpoint(
    shards, tmp_path, fault_result
):
    """Only rank 0 is signalled (a scheduler that signals the launched process alone): the ranks agree at
    the end of the step, rank 0 writes hpc_ckpt_1.ckpt of step 3 and both exit 0."""
    run, marker, log = tmp_path / "run", tmp_path / "rank0.pid", tmp_path / "out.txt"
    hold = {"class_path": "helpers.HoldAt", "init_args": {"at": 2, "marker": str(marker)}}
    args = fit_args(shards, run, callbacks=[hold], devices=2, strategy="ddp")
    with log.open("w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "readout.fit", *args],
            env={**ddp_env(), "PYTHONPATH": str(TESTS)},
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while not marker.exists() or not marker.read_text():
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "rank 0 never reached step 2"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    try:
        code = job.wait(timeout=120)
    finally:
        kill(job.pid)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert f"SIGTERM: stopping after step 3, checkpoint {run / 'hpc_ckpt_1.ckpt'}" in output, output[-3000:]
    assert "a signal to another rank" not in output  # rank 1 logs nothing: rank-zero messages only
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    fault_result.update(steps_lost=0)


def test_lightnings_child_observer_says_why_it_ends_the_job_before_it_kills(capsys):
    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from readout.training.faults import explain_observer_kills

    trainer = SimpleNamespace(world_size=2, default_root_dir="runs/x")
    explain_observer_kills(trainer)  # type: ignore[arg-type]
    explain_observer_kills(trainer)  # type: ignore[arg-type]  # wraps once, not twice
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for rank 0
    try:
        assert _ChildProcessObserver(main_pid=main.pid, child_processes=[dead])._run()
        assert main.wait(timeout=10) == -signal.SIGKILL
    finally:
        kill(main.pid)
    err = capsys.readouterr().err
    assert err.count("rank 0 of 2 stops: another process of this run died") == 1
    assert (
        f"PID {dead.pid} (exit code 3)" in err and "runs/x are whole: run again with --ckpt_path last" in err
    )
