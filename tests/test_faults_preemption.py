"""Preemption: SIGTERM (or SIGUSR1 outside SLURM) mid-epoch or in validation saves at the end of the
(next) step and stops cleanly; the resumed run ends with the weights of a run that was never
interrupted. After the last step, a signal lets the export finish. (Start-up and the μ/σ estimate:
test_signals_early.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import assert_same_readout_weights, ddp_env, fit_args

from readout.readout_bottleneck import ReadoutBottleneck
from readout.training.fit import main as fit

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.fault("preemption", "training, mid-step", "saved after the step, exit 0; resumed from there")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_ends_as_an_uninterrupted_one(
    signal_name,
    uninterrupted,
    shards,
    tmp_path,
    monkeypatch,
    no_slurm,
    fault_result,
):
    """The signal arrives during step 3 of 6 (4 per epoch; last.ckpt is from step 2): hpc_ckpt_1.ckpt holds
    step 3, and the run resumed from it matches the reference in weights, Adam's state and μ/σ."""
    estimates = []
    estimate = ReadoutBottleneck.estimate
    monkeypatch.setattr(
        ReadoutBottleneck, "estimate", lambda *a, **k: estimates.append(1) or estimate(*a, **k)
    )
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "run"
    at = {
        "class_path": "helpers.SignalAt",
        "init_args": {"signal_name": signal_name, "at": 2},
    }
    first = fit(fit_args(shards, run, callbacks=[at]))

    assert first.trainer.interrupted and first.trainer.global_step == 3
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    assert not (run / "export").exists(), "an interrupted run exported a bundle"
    saved = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert all(s["step"] == 3 for s in saved["optimizer_states"][0]["state"].values())
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    second = fit([*fit_args(shards, run), "--ckpt_path", "last"])
    assert second.trainer.global_step == 6 and not second.trainer.interrupted
    assert len(estimates) == 1, "the resumed run estimated μ/σ again instead of restoring them"
    assert_same_readout_weights(second, uninterrupted)
    reference = uninterrupted.model.attributor.statistics
    torch.testing.assert_close(second.model.attributor.statistics.total, reference.total)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(s["step"] == 6 for s in final["optimizer_states"][0]["state"].values())
    fault_result.update(steps_lost=0, same_weights=True)


def test_sigterm_from_outside_stops_the_process_with_exit_code_0_and_a_checkpoint(shards, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "held"
    hold = {"class_path": "helpers.HoldAt", "init_args": {"at": 2, "marker": str(marker)}}
    env = {**ddp_env(), "PYTHONPATH": str(TESTS)}
    with (tmp_path / "out.txt").open("w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "readout.fit", *fit_args(shards, run, callbacks=[hold])],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert job.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    output = (tmp_path / "out.txt").read_text()
    assert f"SIGTERM: stopping after step 3, checkpoint {run / 'hpc_ckpt_1.ckpt'}" in output, output[-3000:]
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "export").exists()


class SignalInValidation(pl.Callback):
    """Sends ``signal_name`` to this process as the validation after step ``after`` starts."""

    def __init__(self, signal_name: str, after: int) -> None:
        self.signum, self.after, self.sent = getattr(signal, signal_name), after, False

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.after and not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.fault("SIGUSR1", "validation", "saved after the next step, exit 0; resumed from there")
def test_a_signal_in_validation_saves_after_the_next_step_and_the_resumed_run_ends_as_uninterrupted(
    uninterrupted,
    shards,
    tmp_path,
    no_slurm,
    fault_result,
):
    """Validation every 2 steps; SIGUSR1 in the one after step 2. The flag is read at the end of the next
    training step, as for a signal within a step: hpc_ckpt_1.ckpt holds step 3, nothing is lost, and
    the resumed run ends as the reference (validation draws no training randomness)."""
    run = tmp_path / "run"
    validation = {"val_check_interval": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    at = {
        "class_path": f"{__name__}.SignalInValidation",
        "init_args": {"signal_name": "SIGUSR1", "after": 2},
    }
    args = [*fit_args(shards, run, callbacks=[at], **validation), "--data.val_shards", str(shards)]
    first = fit(args)
    assert first.trainer.interrupted and first.trainer.global_step == 3
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "export").exists()

    second = fit(
        [*fit_args(shards, run, **validation), "--data.val_shards", str(shards), "--ckpt_path", "last"]
    )
    assert second.trainer.global_step == 6 and not second.trainer.interrupted
    assert_same_readout_weights(second, uninterrupted)
    fault_result.update(steps_lost=0, same_weights=True)


@pytest.mark.fault(
    "SIGUSR1", "final export", "the export finishes; the signal is reported; nothing to requeue"
)
def test_a_signal_during_the_final_export_lets_it_finish_and_says_the_run_was_complete(
    shards,
    tmp_path,
    monkeypatch,
    capsys,
    no_slurm,
    fault_result,
):
    """After the last step nothing is left to save or requeue: the bundle is written whole, the process
    ends normally, and the signal is reported rather than lost."""
    import readout.training.fit

    export = readout.training.fit.export_module

    def signalled_export(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGUSR1)  # the early handler of readout.fit's main catches it
        return export(*args, **kwargs)

    monkeypatch.setattr(readout.training.fit, "export_module", signalled_export)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "run"
    cli = fit(fit_args(shards, run))
    assert cli.trainer.global_step == 6 and not cli.trainer.interrupted
    assert (run / "export" / "readout.json").is_file() and (run / "export" / "readout.safetensors").is_file()
    assert not list(run.glob("hpc_ckpt_*.ckpt"))
    printed = capsys.readouterr()
    assert "SIGUSR1 came after the last training step" in printed.out + printed.err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    fault_result.update(steps_lost=0)
