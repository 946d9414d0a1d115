"""What ``readout.fit`` does when something goes wrong mid-run: callbacks and messages, no training logic.

- :class:`Preemption`: SIGTERM (and SIGUSR1 outside SLURM's requeue) only sets a flag; at the end of
  the running step every rank agrees on it, a checkpoint is written, and the run stops cleanly.
  Nothing is saved inside the signal handler: a save there (all ranks, a barrier) could interleave with
  a DDP all-reduce that the interrupted code was about to issue.
- :class:`BadDataGuard`: logs the share of corrupt training samples and stops the run past
  ``data.max_bad_share``, naming the worst shards.
- :func:`peer_failure_message`: what a rank says when a collective fails because another rank died
  or stalled past the DDP timeout.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import signal
import sys
import threading
from types import FrameType
from typing import Any

import fsspec
import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many training samples were corrupt; the message names the worst shards."""


def next_signal_checkpoint(root: str) -> str:
    """``root/hpc_ckpt_{n}.ckpt`` with n one past the highest there: the name Lightning gives the
    checkpoint of SLURM's requeue signal, which ``--ckpt_path last`` and Lightning's SLURM resume find."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        names = []
    numbers = [int(m.group(1)) for n in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", n))]
    return os.path.join(root, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def _slurm_requeue(trainer: pl.Trainer) -> bool:
    """Whether Lightning's SLURM auto-requeue owns SIGUSR1 (the check its signal connector makes)."""
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


class Preemption(pl.Callback):
    """A signal asks for a checkpoint at the end of the running step, then a clean stop (exit code 0).

    Handled: SIGTERM, and SIGUSR1 unless SLURM's auto-requeue uses it (there Lightning saves
    ``hpc_ckpt_*.ckpt`` and requeues the job; the SIGTERM that follows is passed on to Lightning too).
    Outside SLURM the handlers replace Lightning's SIGTERM handler, whose broadcast inside the handler
    can meet a DDP all-reduce; ``trainer.received_sigterm`` then stays False.

    The checkpoint is ``<default_root_dir>/hpc_ckpt_{n}.ckpt``, saved in ``on_train_batch_end`` like
    ModelCheckpoint's step checkpoints, so a run resumed from it is the uninterrupted run. None is
    written when one of the same step was saved already (the requeue signal's). The run then stops by
    raising Lightning's ``SIGTERMException`` on every rank; ``readout.fit`` reports it and exits 0.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.saved: str | None = None
        self._saved_step: int | None = None
        self._replaced: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        requeue = _slurm_requeue(trainer)
        wanted = [signal.SIGTERM] if requeue else [signal.SIGTERM, signal.SIGUSR1]
        for signum in wanted:
            previous = signal.getsignal(signum)
            passed_on = previous if requeue and callable(previous) else None

            def handler(number: int, frame: FrameType | None, passed_on: Any = passed_on) -> None:
                self.received = signal.Signals(number).name
                if passed_on is not None:
                    passed_on(number, frame)

            self._replaced[signum] = previous
            signal.signal(signum, handler)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every rank takes part in this reduction each step, so all stop after the same step.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation the optimiser has not stepped: save after the step
        if self._saved_step != trainer.global_step:
            path = trainer.strategy.broadcast(next_signal_checkpoint(trainer.default_root_dir))
            trainer.save_checkpoint(path)
            self.saved = path
        rank_zero_info(
            f"{self.received or 'a signal to another rank'}: stopping after step {trainer.global_step}"
            + (f", checkpoint {self.saved}" if self.saved else ", its checkpoint is already saved")
            + "; resume with --ckpt_path last"
        )
        raise SIGTERMException()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        """Puts back the handlers replaced; Lightning's teardown then restores those from before fit."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._replaced.items():
                signal.signal(signum, previous)
        self._replaced = {}


class BadDataGuard(pl.Callback):
    """Logs ``data/bad_samples`` and ``data/bad_share`` of the training shards each step and stops the
    run (on every rank) once a rank is past ``datamodule.max_bad_share``, naming the worst shards."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        health = getattr(getattr(trainer.train_dataloader, "dataset", None), "health", None)
        limit = getattr(trainer.datamodule, "max_bad_share", None)  # type: ignore[attr-defined]
        if health is None or limit is None:
            return
        report = health()
        pl_module.log_dict(
            {"data/bad_samples": float(report.bad), "data/bad_share": report.share}, batch_size=1
        )
        message = report.verdict(limit)
        if trainer.strategy.reduce_boolean_decision(message is not None, all=False):
            raise BadDataError(message or "another rank read too many bad samples: see its log")


def peer_failure_message(trainer: pl.Trainer, error: BaseException) -> str:
    """What a rank prints when a collective fails: a peer died, or stalled past the DDP timeout."""
    timeout = getattr(trainer.strategy, "_timeout", None)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"rank {trainer.global_rank} of {trainer.world_size} stops: a collective operation failed "
        f"({first}). Another process of this run has most likely died, or stalled longer than the DDP "
        f"timeout ({timeout}; set trainer.strategy.init_args.timeout). The checkpoints under "
        f"{trainer.default_root_dir} are whole: run again with --ckpt_path last to resume."
    )


#: What Lightning's child-process observer says before it kills the job (see :func:`explain_observer_kills`).
_observer_advice: dict[str, Any] = {}


def explain_observer_kills(trainer: pl.Trainer) -> None:
    """Makes Lightning's subprocess launcher say why it ends the job, and how to resume.

    With ``--trainer.devices N`` and no cluster launcher, rank 0 starts the other ranks itself and a
    thread polls them every 5 s: when one has died it SIGKILLs every rank, rank 0 included, often
    before rank 0 reaches its next collective and prints :func:`peer_failure_message`. This wraps that
    thread's ``_terminate_all`` (private to lightning_fabric; skipped if it is gone) to print the
    advice first. torchrun and srun do not use that thread.
    """
    from lightning_fabric.strategies.launchers import subprocess_script

    observer = getattr(subprocess_script, "_ChildProcessObserver", None)
    original = getattr(observer, "_terminate_all", None)
    _observer_advice.update(world_size=trainer.world_size, root=trainer.default_root_dir)
    if observer is None or original is None or getattr(original, "explains", False):
        return

    def terminate_all(self: Any) -> None:
        dead = ", ".join(
            f"PID {p.pid} (exit code {p.returncode})" for p in self._child_processes if p.returncode
        )
        print(
            f"rank 0 of {_observer_advice['world_size']} stops: another process of this run died ({dead}); "
            f"Lightning ends the remaining ones. The checkpoints under {_observer_advice['root']} are "
            "whole: run again with --ckpt_path last to resume.",
            file=sys.stderr,
            flush=True,
        )
        original(self)

    terminate_all.explains = True  # type: ignore[attr-defined]
    observer._terminate_all = terminate_all  # type: ignore[union-attr]
