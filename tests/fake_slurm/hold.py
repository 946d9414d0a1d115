"""A callback that holds a readout.fit run in one phase until readout.training.faults.Preemption has
received a signal, so that a test can send it there (tests/test_slurm_real.py).

``phase``: ``estimate`` (as the μ/σ estimate's second batch comes), ``train`` (in step 3, between the
forward and the backward pass) or ``validation`` (in the validation after step 2). On arrival it
writes its process id to ``marker``; a run that finds ``marker`` there already (the requeued job) does
not hold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from readout.training.faults import Preemption


class HoldIn(pl.Callback):
    def __init__(self, phase: str, marker: str, timeout: float = 300.0) -> None:
        if phase not in ("estimate", "train", "validation"):
            raise ValueError(f"phase {phase!r}")
        self.phase, self.marker, self.timeout = phase, Path(marker), timeout
        self.armed = not self.marker.exists()

    def hold(self, trainer: pl.Trainer) -> None:
        if not self.armed:
            return
        self.armed = False
        (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]  # type: ignore[attr-defined]
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.phase != "estimate":
            return
        data = trainer.datamodule  # type: ignore[attr-defined]
        original = data.estimate_dataloader

        def held() -> Iterator[Any]:
            for index, batch in enumerate(original()):
                if index == 1:
                    self.hold(trainer)
                yield batch

        data.estimate_dataloader = held

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.phase == "train" and trainer.global_step == 2:
            self.hold(trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.phase == "validation" and trainer.global_step == 2 and not trainer.sanity_checking:
            self.hold(trainer)
