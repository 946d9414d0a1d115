"""NaN or Inf in the loss or the gradients: the run stops with the last good checkpoint kept, or
(``--model.nonfinite skip``) the batch is skipped without an optimiser step and counted, on one
process and on two (gloo), where a NaN on one rank makes both skip the step."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import ddp_env, fit_args

from readout.readout_bottleneck import ReadoutLoss
from readout.training.checkpointing import read_checkpoint
from readout.training.fit import main as fit
from readout.training.module import ReadoutModule

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The training loss is NaN at the given global steps."""
    shared_step = ReadoutModule.shared_step

    def poisoned(self: ReadoutModule, batch: dict[str, Any]) -> ReadoutLoss:
        out = shared_step(self, batch)
        if self.training and self.global_step in steps:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(ReadoutModule, "shared_step", poisoned)


class InfGradientAt(pl.Callback):
    """Makes a gradient Inf after the backward pass of step ``at``; records the readout's weights around
    every step in ``weights[step] = (before, after)``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def flat(pl_module: Any) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in pl_module.attributor.net.parameters()])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.before = self.flat(pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step == self.at:
            grad = next(p.grad for p in pl_module.attributor.net.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.weights[trainer.global_step - 1] = (self.before, self.flat(pl_module))


@pytest.mark.fault(
    "NaN loss (default)", "training", "the run stops naming the step; the last checkpoint is finite and kept"
)
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, no_slurm):
    nan_loss_at(monkeypatch, {3})
    run = tmp_path / "run"
    with pytest.raises(
        FloatingPointError, match=r"loss is nan .* at step 3; the run stops and the last checkpoint"
    ):
        fit(fit_args(shards, run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # whole and finite
    assert not list(run.glob("hpc_ckpt_*")) and not (run / "export").exists()


@pytest.mark.fault(
    "NaN loss, Inf gradient (--model.nonfinite skip)",
    "training",
    "the batches are skipped and counted; no state holds a NaN",
)
def test_skip_leaves_out_nonfinite_batches_counts_them_and_saves_only_finite_state(
    shards, tmp_path, monkeypatch, no_slurm
):
    """NaN loss at steps 1 and 3, an Inf gradient at step 4: three of six batches change nothing."""
    nan_loss_at(monkeypatch, {1, 3})
    run = tmp_path / "run"
    watch = {"class_path": f"{__name__}.InfGradientAt", "init_args": {"at": 4}}
    cli = fit([*fit_args(shards, run, callbacks=[watch]), "--model.nonfinite", "skip"])

    assert cli.trainer.global_step == 6 and cli.model.nonfinite_skipped == 3
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfGradientAt)]
    for step, (before, after) in callback.weights.items():
        assert torch.equal(before, after) == (step in {1, 3, 4}), step
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")  # refuses NaN: it holds none
    assert checkpoint["readout_nonfinite_skipped"] == 3
    assert all(s["step"] == 3 for s in checkpoint["optimizer_states"][0]["state"].values())
    with (run / "csv" / "metrics.csv").open() as handle:
        logged = [
            float(r["train/nonfinite_skipped"])
            for r in csv.DictReader(handle)
            if r["train/nonfinite_skipped"]
        ]
    assert logged == [0, 1, 1, 2, 3, 3]
    assert (run / "export" / "readout.safetensors").is_file()


def test_the_skip_count_survives_a_resume(shards, tmp_path, monkeypatch, no_slurm):
    nan_loss_at(monkeypatch, {1})
    run = tmp_path / "run"
    fit([*fit_args(shards, run), "--model.nonfinite", "skip", "--trainer.max_steps", "2"])
    resumed = fit([*fit_args(shards, run), "--model.nonfinite", "skip", "--ckpt_path", "last"])
    assert resumed.model.nonfinite_skipped == 1 and resumed.trainer.global_step == 6


class NanImagesAt(pl.Callback):
    """On rank ``rank`` makes the images of step ``at`` NaN, so only that rank's loss is NaN. Every rank
    records the readout's weights around each step and, at the end, saves them with its skip count
    to ``<out>/rank<r>.pt``."""

    def __init__(self, at: int, rank: int, out: str) -> None:
        self.at, self.rank, self.out = at, rank, Path(out)
        self.changed: dict[int, bool] = {}

    @staticmethod
    def flat(pl_module: Any) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in pl_module.attributor.net.parameters()])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at and trainer.global_rank == self.rank:
            batch["image"].fill_(float("nan"))
        self.before = self.flat(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.changed[trainer.global_step - 1] = not torch.equal(self.before, self.flat(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        torch.save(
            {
                "skipped": pl_module.nonfinite_skipped,
                "changed": self.changed,
                "weights": self.flat(pl_module),
                "steps": trainer.global_step,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.fault("NaN loss on one rank (skip)", "training, 2 processes", "both ranks skip the step")
@pytest.mark.ddp
def test_skip_under_ddp_a_nan_on_one_rank_skips_the_step_on_both(shards, tmp_path):
    """Two gloo processes; rank 1's loss is NaN at step 2: both skip it, count 1, train on, and end with
    the same weights."""
    watch = {"class_path": f"{__name__}.NanImagesAt", "init_args": {"at": 2, "rank": 1, "out": str(tmp_path)}}
    args = fit_args(shards, tmp_path / "run", callbacks=[watch], devices=2, strategy="ddp", max_steps=4)
    result = subprocess.run(
        [sys.executable, "-m", "readout.fit", *args, "--model.nonfinite", "skip"],
        env={**ddp_env(), "PYTHONPATH": str(TESTS)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["steps"] == 4 and rank["skipped"] == 1
        assert rank["changed"] == {0: True, 1: True, 2: False, 3: True}
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["readout_nonfinite_skipped"] == 1
    assert all(s["step"] == 3 for s in checkpoint["optimizer_states"][0]["state"].values())
