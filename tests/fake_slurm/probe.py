"""A callback that lets tests watch and interrupt a readout.fit run in another process.

It appends the global step of every training batch to ``steps_file`` (one line per batch, so a
resumed run shows where it picked up). In step ``hold_at`` (global step before it), between the
forward and the backward pass, it writes its process id to ``marker`` and holds the run until
:class:`readout.training.faults.Preemption` has received a signal: the test sends SIGUSR1 when the marker
appears, so the signal lands in the middle of a step.

In a run of several processes, ``{rank}`` in ``steps_file`` and ``marker`` becomes each process's
global rank, and every rank holds until it has been signalled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from readout.training.faults import Preemption


class Probe(pl.Callback):
    def __init__(self, steps_file: str, hold_at: int = -1, marker: str = "", timeout: float = 120.0) -> None:
        self.steps_file, self.hold_at, self.marker, self.timeout = Path(steps_file), hold_at, marker, timeout

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        with Path(str(self.steps_file).format(rank=trainer.global_rank)).open("a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if trainer.global_step != self.hold_at:
            return
        (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]  # type: ignore[attr-defined]
        Path(self.marker.format(rank=trainer.global_rank)).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.05)
