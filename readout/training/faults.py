"""What ``readout.fit`` does when something goes wrong mid-run: callbacks and messages, no training logic.

- :class:`Preemption`: SIGTERM and SIGUSR1 (SLURM's requeue signal too) only set a flag; at the end
  of the running step every rank agrees on it, a checkpoint is written, under SLURM the job is
  requeued, and the run stops cleanly. Nothing is saved inside the signal handler: a save there (all
  ranks, a barrier) could interleave with a DDP all-reduce that the interrupted code was about to issue.
- :class:`BadDataGuard`: logs the share of corrupt training samples and stops the run past
  ``data.max_bad_share``, naming the worst shards.
- :func:`peer_failure_message`: what a rank says when a collective fails because another rank died
  or stalled past the DDP timeout.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Any, NoReturn

import fsspec
import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from readout.atomic import atomic_write
from readout.training.signals import hand_over

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many training samples were corrupt; the message names the worst shards."""


SIGNAL_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
#: One JSON line per requeue asked for, in the run directory: job, step, time, signal, checkpoint.
REQUEUE_LOG = "requeues.jsonl"


def signal_checkpoints(root: str) -> list[tuple[int, str]]:
    """(n, path) of every ``hpc_ckpt_{n}.ckpt`` in ``root``, oldest (lowest n) first; [] without ``root``."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := SIGNAL_CHECKPOINT.fullmatch(n))]
    return [(number, posixpath.join(path, name)) for number, name in sorted(found)]


def next_signal_checkpoint(root: str) -> str:
    """``root/hpc_ckpt_{n}.ckpt`` with n one past the highest there: the name Lightning's SLURM resume
    looks for, and one that ``--ckpt_path last`` finds."""
    numbers = [number for number, _ in signal_checkpoints(root)]
    return os.path.join(root, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def checked_keep(keep: int) -> int:
    """``keep`` of :func:`prune_signal_checkpoints`, refused below 1 (the newest is what a resume needs)."""
    if keep < 1:
        raise ValueError(f"keep_signal_checkpoints must be >= 1, got {keep}")
    return keep


def prune_signal_checkpoints(root: str, keep: int) -> list[str]:
    """Removes all but the newest ``keep`` (>= 1) ``hpc_ckpt_{n}.ckpt`` in ``root``; the paths removed.

    A job requeued every day leaves one per requeue, each a whole training state; the newest is
    what ``--ckpt_path last`` resumes from, and one before it is kept by default in case it is bad.
    """
    removed = [path for _, path in signal_checkpoints(root)[: -checked_keep(keep)]]
    fs, _ = fsspec.core.url_to_fs(root)
    for old in removed:
        fs.rm(old)
    return removed


def read_requeues(root: str) -> list[dict[str, Any]]:
    """The entries of ``root/requeues.jsonl``, oldest first; a line cut short by a crash is left out."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        with fs.open(posixpath.join(path, REQUEUE_LOG), "r") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def record_requeue(root: str, entry: dict[str, Any]) -> None:
    """Appends ``entry`` to ``root/requeues.jsonl`` (rewritten whole: fsspec has no append everywhere)."""
    lines = [json.dumps(e) for e in [*read_requeues(root), entry]]
    atomic_write(posixpath.join(root, REQUEUE_LOG), ("\n".join(lines) + "\n").encode())


def no_progress(root: str, step: int, estimated: int | None = None) -> str | None:
    """Why a requeue at ``step`` is refused: the last requeue of the run was at this very step (and,
    before the first step, after as many μ/σ samples: ``estimated``), so the job would come back to
    the same point (a signal in start-up, every time); None otherwise."""
    earlier = [e for e in read_requeues(root) if e.get("requeued")]
    if not earlier or (earlier[-1].get("step"), earlier[-1].get("estimated")) != (step, estimated):
        return None
    where = f"step {step}" + ("" if estimated is None else f" with {estimated} μ/σ samples")
    return (
        f"not requeueing: the run is at {where}, as at its last requeue (job "
        f"{earlier[-1].get('job')}, {earlier[-1].get('time')}), so it has made no progress since. "
        f"See {posixpath.join(root, REQUEUE_LOG)}; resume by hand with --ckpt_path last once the "
        "cause is fixed"
    )


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else SLURM_JOB_ID."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"\d+(_\d+)?", job):
        raise ValueError(f"not a SLURM job id: {job!r}")
    return job


def requeue_slurm_job() -> str | None:
    """Runs ``scontrol requeue <job id>``; the job id, or None (and a warning) where that failed."""
    try:
        job = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except (KeyError, ValueError, OSError) as error:
        rank_zero_warn(f"cannot requeue the SLURM job ({error}): resume it by hand with --ckpt_path last")
        return None
    if result.returncode != 0:
        rank_zero_warn(
            f"`scontrol requeue {job}` failed with exit code {result.returncode} "
            f"({result.stderr.strip()}): resume the job by hand with --ckpt_path last"
        )
        return None
    return job


class Preemption(pl.Callback):
    """A signal asks for a checkpoint at the end of the running step, then a clean stop (exit code 0).

    Handled: SIGTERM and SIGUSR1 (under SLURM: its environment's requeue signal, SIGUSR1 unless set).
    The handlers only set a flag; they replace Lightning's, which save a checkpoint (SLURM's requeue
    signal) or broadcast (SIGTERM) inside the handler, in the middle of a step, where that can meet a
    DDP all-reduce the interrupted code was about to issue and save a state between two steps. So
    that Lightning does not install its SLURM handler at all, :meth:`setup` turns the environment's
    ``auto_requeue`` off (it is read when Lightning registers its handlers, after this hook) and
    remembers it; ``trainer.received_sigterm`` stays False.

    At the end of the step every rank agrees on the flag; rank 0 writes
    ``<default_root_dir>/hpc_ckpt_{n}.ckpt`` (saved in ``on_train_batch_end`` like ModelCheckpoint's
    step checkpoints, so a run resumed from it is the uninterrupted run). If the requeue signal
    reached any rank and SLURM's auto-requeue was on, rank 0 then runs ``scontrol requeue $SLURM_JOB_ID``
    and the ranks wait for it. Every rank stops by raising Lightning's ``SIGTERMException``;
    ``readout.fit`` reports it and exits 0. The requeued job finds the checkpoint with
    ``--ckpt_path last`` in the same run directory.
    """

    def __init__(self, keep_signal_checkpoints: int = 2) -> None:
        self.keep_signal_checkpoints = keep_signal_checkpoints
        self.received: str | None = None
        self._numbers: set[int] = set()  # every signal number received
        self._early: dict[int, Any] = {}  # handlers replaced by install_early
        self.saved: str | None = None
        self.requeued: str | None = None
        self._requeue_signal: signal.Signals | None = None
        self._environment: SLURMEnvironment | None = None
        self._replaced: dict[int, Any] = {}

    @property
    def keep_signal_checkpoints(self) -> int:
        """How many ``hpc_ckpt_*.ckpt`` stay after each save (:func:`prune_signal_checkpoints`)."""
        return self._keep

    @keep_signal_checkpoints.setter
    def keep_signal_checkpoints(self, keep: int) -> None:
        self._keep = checked_keep(keep)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment):
            return
        if environment.auto_requeue:
            self._environment = environment
            self._requeue_signal = environment.requeue_signal or signal.SIGUSR1
            environment.auto_requeue = False  # restored in _restore

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def _install(self, trainer: pl.Trainer) -> None:
        """Replaces the handlers Lightning registered (after ``on_fit_start``, before the sanity check)."""
        if self._replaced or threading.current_thread() is not threading.main_thread():
            return  # installed already, or signal handlers cannot be set from this thread
        environment = trainer._accelerator_connector.cluster_environment
        stop = getattr(environment, "requeue_signal", None) or signal.SIGUSR1
        for signum in {signal.SIGTERM, stop}:
            self._replaced[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _handler(self, number: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(number).name
        self._numbers.add(number)

    @property
    def _requeue_asked(self) -> bool:
        """Whether the requeue signal came (judged when it is known: before ``setup`` it is not)."""
        return self._requeue_signal is not None and self._requeue_signal in self._numbers

    def install_early(self) -> None:
        """Sets the flag-only handler for SIGTERM and SIGUSR1 from ``readout.fit``'s first line on.

        Lightning registers its handlers only after ``on_fit_start`` (where the μ/σ estimate runs),
        so a signal during start-up or the estimate would otherwise meet the default action, which
        for SIGUSR1 kills the process (a SLURM job ``FAILED`` with exit code 138, no checkpoint, no
        requeue). With this the signal is remembered, the estimate stops and keeps its part, and the
        job is requeued (:meth:`stop_before_training`). :meth:`uninstall_early` puts back what was there.
        """
        if self._early or threading.current_thread() is not threading.main_thread():
            return
        numbers, caught = hand_over()  # what readout.fit's first lines caught, before its imports
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._early[signum] = caught.get(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)
        for number in numbers:
            self._handler(number, None)

    def uninstall_early(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._early.items():
                signal.signal(signum, previous)
        self._early = {}

    def stop_before_training(self, trainer: pl.Trainer, where: str, estimated: int) -> NoReturn:
        """Stops a run that a signal reached before its first training step (``where``: what was kept),
        requeueing the job under SLURM when the requeue signal came; raises ``SIGTERMException``."""
        if self._requeue_asked and trainer.is_global_zero:
            self.requeued = self._requeue(
                trainer.default_root_dir, trainer.global_step, None, estimated=estimated
            )
        rank_zero_info(
            f"{self.received}: stopped {where}"
            + (f"; requeued SLURM job {self.requeued}" if self.requeued else "")
            + "; run again with --ckpt_path last to go on"
        )
        raise SIGTERMException()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every rank takes part in this reduction each step, so all stop after the same step.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation the optimiser has not stepped: save after the step
        # Reached by every rank at once: the second reduction pairs up as the first does.
        requeue = self._requeue_signal is not None and trainer.strategy.reduce_boolean_decision(
            self._requeue_asked, all=False
        )
        root = trainer.default_root_dir
        path = trainer.strategy.broadcast(next_signal_checkpoint(root))
        trainer.save_checkpoint(path, weights_only=False)  # a whole training state, said so (no log line)
        self.saved = path
        if trainer.is_global_zero:
            prune_signal_checkpoints(root, self.keep_signal_checkpoints)
        if requeue:
            if trainer.is_global_zero:
                self.requeued = self._requeue(root, trainer.global_step, path)
            trainer.strategy.barrier("readout-requeue")  # no rank exits before the job is requeued
        rank_zero_info(
            f"{self.received or 'a signal to another rank'}: stopping after step {trainer.global_step}, "
            f"checkpoint {path}"
            + (f"; requeued SLURM job {self.requeued}" if self.requeued else "")
            + "; resume with --ckpt_path last"
        )
        raise SIGTERMException()

    def _requeue(
        self, root: str, step: int, checkpoint: str | None, estimated: int | None = None
    ) -> str | None:
        """Requeues the job unless it made no progress since its last requeue (:func:`no_progress`);
        either way the attempt goes into ``requeues.jsonl``."""
        refused = no_progress(root, step, estimated)
        if refused is not None:
            rank_zero_warn(refused)
        job = None if refused is not None else requeue_slurm_job()
        entry = {
            "job": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "step": step,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "signal": self.received,
            "checkpoint": checkpoint,
            "estimated": estimated,
            "requeued": job is not None,
        }
        record_requeue(root, entry)
        return job

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        """Puts back the handlers replaced (Lightning's teardown then restores those from before fit)
        and the environment's auto-requeue."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._replaced.items():
                signal.signal(signum, previous)
        self._replaced = {}
        if self._environment is not None:
            self._environment.auto_requeue = True
            self._environment = None


class FinalCheckpoint(pl.Callback):
    """At the end of training, writes each ModelCheckpoint's ``last`` checkpoint again where the newest
    one is not of the final step (``every_n_train_steps: 50`` over 375 steps left step 350).

    Public API only: saves are seen in ``on_save_checkpoint``, and the path is the callback's
    ``dirpath`` with its ``CHECKPOINT_NAME_LAST``. Not on an interrupted run (Preemption has saved).
    """

    def __init__(self) -> None:
        self.saved_step: int | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.saved_step = checkpoint.get("global_step")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or self.saved_step == trainer.global_step:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, pl.callbacks.ModelCheckpoint) and callback.save_last and callback.dirpath:
                name = callback.CHECKPOINT_NAME_LAST.format(
                    step=trainer.global_step, epoch=trainer.current_epoch
                )
                path = posixpath.join(callback.dirpath, name + callback.FILE_EXTENSION)
                trainer.save_checkpoint(path, weights_only=False)


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


def loader_worker_died(error: BaseException) -> bool:
    """Whether an error is torch's report of a data loader worker that died (killed, or crashed)."""
    return isinstance(error, RuntimeError) and re.search(r"DataLoader worker \(pid", str(error)) is not None


def loader_worker_message(trainer: pl.Trainer, error: BaseException) -> str:
    """What a rank prints when one of its data loader workers died: most often the kernel's OOM killer."""
    first = str(error).strip().splitlines()[0]
    return (
        f"rank {trainer.global_rank} stops at step {trainer.global_step}: a data loader worker died "
        f"({first}). A worker killed by signal 9 (SIGKILL) was most likely chosen by the kernel's OOM "
        "killer: lower data.num_workers or data.shuffle_buffer, or ask for more memory. The checkpoints "
        f"under {trainer.default_root_dir} are whole: run again with --ckpt_path last to resume."
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
