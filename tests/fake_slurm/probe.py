"""A callback that lets tests watch and interrupt a readout.fit run in another process.

It appends the global step of every training batch to ``steps_file`` (one line per batch, so a
resumed run shows where it picked up). After step ``hold_at`` it writes its process id to ``marker``
and holds the run until SIGTERM, as a job that SLURM has signalled waits for its requeue: the test
sends SIGUSR1 when the marker appears, and SIGTERM once the requeue is recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl


class Probe(pl.Callback):
    def __init__(self, steps_file: str, hold_at: int = -1, marker: str = "", timeout: float = 120.0) -> None:
        self.steps_file, self.hold_at, self.marker, self.timeout = Path(steps_file), hold_at, marker, timeout

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        with self.steps_file.open("a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.hold_at:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
