"""NaN or Inf in the loss or the gradients: the run stops with the last good checkpoint kept, or
(``--model.nonfinite skip``) the batch is skipped without an optimiser step and counted."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import pytorch_lightning as pl
import test_reliability as shared
import torch
from test_reliability import fit_args

from readout.checkpointing import read_checkpoint
from readout.fit import main as fit
from readout.lit import ReadoutModule

one_thread, no_slurm, shards = shared.one_thread, shared.no_slurm, shared.shards  # fixtures


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The training loss is NaN at the given global steps."""
    shared_step = ReadoutModule.shared_step

    def poisoned(self: ReadoutModule, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = shared_step(self, batch)
        if self.training and self.global_step in steps:
            out["loss"] = out["loss"] * float("nan")
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
