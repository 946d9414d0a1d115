"""Signals before the first training step: during start-up (imports, model building) and during the
μ/σ estimate. Before, SIGUSR1 there met its default action and killed the job (SLURM: FAILED, exit
code 138, no checkpoint, no requeue); now it is remembered, the estimate keeps its part, the job is
requeued, and the next run goes on from where the signal came."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAKE_SLURM, JOB_ID, REPO, assert_same_readout_weights, clean_env, fit_args, slurm_env

from readout.training.datamodule import ReadoutDataModule
from readout.training.faults import REQUEUE_LOG, read_requeues
from readout.training.fit import main as fit

pytestmark = pytest.mark.usefixtures("one_thread")


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (SigCgt of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def signalled_at_start(command: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Starts ``command``, sends SIGUSR1 as soon as it catches it (its first lines, before torch is
    imported), and returns its exit code and output."""
    with log.open("w") as out:
        job = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while not catches(job.pid, signal.SIGUSR1):
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    imported = "torch" in Path(f"/proc/{job.pid}/maps").read_text()
    os.kill(job.pid, signal.SIGUSR1)
    code = job.wait(timeout=240)
    assert not imported, "the handler came only after torch was imported: test the earlier window"
    return code, log.read_text()


@pytest.mark.fault(
    "SIGUSR1 under SLURM", "start-up (imports)", "requeued once; the same again without progress is refused"
)
def test_a_requeue_signal_during_start_up_requeues_once_then_refuses_without_progress(
    shards, tmp_path, fault_result
):
    """Under SLURM (fake scontrol): SIGUSR1 during the imports of the first incarnation requeues the job
    with nothing estimated yet; the same again in the second one, with no progress, is refused."""
    run = tmp_path / "run"
    config = Path(fit_args(shards, run)[1])
    env = slurm_env(run, config, tmp_path / "scontrol.log")
    command = [sys.executable, "-m", "readout.fit", "--config", str(config), "--run_dir", str(run)]
    code, out = signalled_at_start([*command, "--ckpt_path", "last"], env, tmp_path / "first.out")
    assert code == 0, out[-3000:]
    assert "SIGUSR1: stopped before the μ/σ estimate" in out and f"requeued SLURM job {JOB_ID}" in out
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
    code, out = signalled_at_start([*command, "--ckpt_path", "last"], env, tmp_path / "second.out")
    assert code == 0, out[-3000:]
    assert "not requeueing" in out and "no progress" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # not a second time
    entries = read_requeues(str(run))
    assert [(e["step"], e["estimated"], e["requeued"]) for e in entries] == [(0, 0, True), (0, 0, False)]
    assert not list(run.glob("**/*.ckpt"))
    fault_result.update(steps_lost=0)


@pytest.mark.fault("SIGTERM", "start-up (imports)", "stops cleanly, exit 0")
def test_sigterm_during_start_up_outside_slurm_stops_cleanly(shards, tmp_path, fault_result):
    run = tmp_path / "run"
    config = Path(fit_args(shards, run)[1])
    env = clean_env()
    env["PYTHONPATH"] = str(FAKE_SLURM)
    command = [sys.executable, "-m", "readout.fit", "--config", str(config), "--run_dir", str(run)]
    code, out = signalled_at_start(command, env, tmp_path / "out")
    assert code == 0, out[-3000:]
    assert "stopped before the μ/σ estimate" in out and not (run / REQUEUE_LOG).exists()
    fault_result.update(steps_lost=0)


def signal_at_estimate_batch(monkeypatch: pytest.MonkeyPatch, signum: int, at: int) -> None:
    """The estimate's loader sends ``signum`` to this process as it hands out batch ``at``."""
    original = ReadoutDataModule.estimate_dataloader

    def loader(self: ReadoutDataModule) -> Any:
        for index, batch in enumerate(original(self)):
            if index == at:
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(ReadoutDataModule, "estimate_dataloader", loader)


@pytest.mark.fault(
    "SIGTERM", "μ/σ estimate", "the estimate keeps its part; the next run estimates only the rest"
)
def test_a_signal_in_the_estimate_keeps_its_part_and_the_next_run_goes_on_from_it(
    uninterrupted,
    shards,
    tmp_path,
    monkeypatch,
    no_slurm,
    fault_result,
):
    """8 samples in batches of 4: SIGTERM as the second batch comes. The first run keeps 4 samples'
    sums and stops; the second estimates only the other 4 and ends as the uninterrupted run."""
    run = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as patch:
        signal_at_estimate_batch(patch, signal.SIGTERM, at=1)
        first = fit(fit_args(shards, run))
    assert first.trainer.interrupted and first.trainer.global_step == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    part = run / "estimate" / "rank-0.safetensors"
    assert part.is_file() and not list(run.glob("**/*.ckpt")) and not (run / "export").exists()

    seen: list[int] = []
    estimate = first.model.attributor.__class__.estimate

    def counting(self: Any, batches: Any, *args: Any, **kwargs: Any) -> Any:
        return estimate(self, (seen.append(len(b["image"])) or b for b in batches), *args, **kwargs)

    monkeypatch.setattr(first.model.attributor.__class__, "estimate", counting)
    second = fit([*fit_args(shards, run), "--ckpt_path", "last"])
    assert seen == [4], "the second run estimated more than the part that was missing"
    assert second.trainer.global_step == 6 and not part.exists()
    reference = uninterrupted.model.attributor
    for mine, theirs in zip(
        second.model.attributor.all_statistics(), reference.all_statistics(), strict=True
    ):
        torch.testing.assert_close(mine.total, theirs.total, rtol=0, atol=0)
        assert mine.count.item() == theirs.count.item() == 8
    assert_same_readout_weights(second, uninterrupted)
    fault_result.update(steps_lost=0, same_weights=True)


def test_a_part_of_another_estimate_is_not_continued(shards, tmp_path, monkeypatch, no_slurm):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_at_estimate_batch(patch, signal.SIGTERM, at=1)
        fit(fit_args(shards, run))
    with pytest.warns(UserWarning, match="part of another estimate"):
        cli = fit([*fit_args(shards, run), "--model.estimate_samples", "12", "--trainer.max_steps", "1"])
    assert cli.model.attributor.statistics.count.item() == 12
    assert json.loads((run / "export" / "readout.json").read_text())["training"]["steps"] == 1
