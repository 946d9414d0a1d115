"""``python -m readout.fit --config configs/resnet50.yaml``: train a Readout Bottleneck, then export it.

A LightningCLI: every field of the config can be overridden on the command line
(``--trainer.devices 8 --data.train_shards 'data/imagenet/train-{000000..001023}.tar'``).
``--run_dir DIR`` moves the whole run into DIR (logs, checkpoints, bundle). ``--ckpt_path last``
resumes from the newest checkpoint of the run directory (step, optimiser, estimator statistics,
position in the data), a SLURM requeue's ``hpc_ckpt_*.ckpt`` included. At the end, rank 0 exports a
bundle to ``--export_dir`` (default ``<trainer.default_root_dir>/export``) that ``readout.load`` reads
without Lightning.

Faults (see readout.training.faults and readout.training.checkpointing): checkpoints are written
atomically and read with ``weights_only=True`` after a whole-file check; ``--ckpt_path last`` passes
over a corrupt one to the previous good one and says so; SIGTERM or SIGUSR1 saves a checkpoint at the
end of the step and exits 0 (under SLURM, SIGUSR1 also requeues the job first; in validation, at the end
of the next step; during start-up or the μ/σ estimate, see readout.training.signals; after the last
step, the export finishes); too many corrupt samples stop the run naming the worst shards; in a DDP run
a rank whose peer died or stalled past the timeout says so and exits. A config whose parts do not fit
together (image and input size, layers) fails before any data is read.
"""

from __future__ import annotations

import glob
import posixpath
import re
import shlex
import sys
import time
import traceback
import warnings
from datetime import UTC, datetime
from typing import Any

import fsspec
import torch
from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from readout.logs import show_info
from readout.training.checkpointing import CheckpointError, ReadoutCheckpointIO, first_usable, read_checkpoint
from readout.training.datamodule import ReadoutDataModule
from readout.training.export import export_module
from readout.training.faults import (
    BadDataError,
    BadDataGuard,
    FinalCheckpoint,
    Preemption,
    explain_observer_kills,
    loader_worker_died,
    loader_worker_message,
    peer_failure_message,
)
from readout.training.module import ReadoutModule


class ReadoutCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from: a path, or 'last' for the newest in the run directory",
        )
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where the bundle goes at the end (default: <trainer.default_root_dir>/export)",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="the run's directory: becomes trainer.default_root_dir, and the logger's save_dir, the "
            "checkpoint dirpaths and export_dir that lie under the config's default_root_dir move with it",
        )

        parser.add_argument(
            "--keep_signal_checkpoints",
            type=int,
            default=2,
            help="hpc_ckpt_*.ckpt files (one per preemption) kept in the run directory, newest first",
        )

    def before_instantiate_classes(self) -> None:
        if self.config.run_dir is not None:
            move_run(self.config, self.config.run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a configured one is left alone
            trainer.strategy.checkpoint_io = ReadoutCheckpointIO()
        return trainer


def move_run(config: Namespace, run_dir: str) -> None:
    """Puts a parsed config's run into ``run_dir``: paths under the old default_root_dir are rebased.

    One directory per run is what a requeued SLURM job needs to find its checkpoints again; a config's
    paths cannot be overridden one by one from the command line when they sit in a list of callbacks.
    Paths are handled as strings, so ``run_dir`` may be an fsspec URL (``s3://bucket/run``).
    """
    old = config.trainer.default_root_dir
    config.trainer.default_root_dir = run_dir

    def rebase(path: str | None) -> str | None:
        inside = None if path is None or old is None else relative_to(path, old)
        return path if inside is None else join_path(run_dir, inside)

    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    for component in [*loggers, *(config.trainer.callbacks or [])]:
        init_args = getattr(component, "init_args", None)
        for key in ("save_dir", "dirpath"):
            if init_args is not None and getattr(init_args, key, None) is not None:
                setattr(init_args, key, rebase(getattr(init_args, key)))
    config.export_dir = rebase(config.export_dir)


def _normalised(path: str) -> str:
    """A local path without ``./`` or ``//``; a URL unchanged but for trailing slashes."""
    return path.rstrip("/") if "://" in path else posixpath.normpath(path)


def relative_to(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` ("" for root itself), or None where it lies outside; paths or URLs."""
    path, root = _normalised(path), _normalised(root)
    if path == root:
        return ""
    return path[len(root) + 1 :] if path.startswith(root.rstrip("/") + "/") else None


def join_path(root: str, relative: str) -> str:
    """``root/relative`` for a local path or an fsspec URL (pathlib would turn ``s3://`` into ``s3:/``)."""
    return posixpath.join(root, relative) if relative else root


def resolve_checkpoint(ckpt_path: str | None, root: str) -> str | None:
    """'last' means the newest checkpoint of the run directory, or a fresh start if there is none.

    Candidates: ``last*.ckpt`` anywhere under ``root`` (ModelCheckpoint's) and ``root/hpc_ckpt_*.ckpt``
    (what readout.training.faults.Preemption saves on SIGTERM or SIGUSR1, SLURM's requeue signal included).
    Lightning looks for the latter only when no checkpoint is given, so it has to be weighed here. On
    equal times (coarse clocks of network file systems) the signal's checkpoint wins: it is written
    after the periodic one of the same step.
    """
    if ckpt_path != "last":
        return ckpt_path
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


def resume_candidates(root: str, fallbacks: bool = False) -> list[str]:
    """The checkpoints ``--ckpt_path last`` may take, newest first (see :func:`resolve_checkpoint`).

    ``root`` is a local path or an fsspec URL; the candidates are listed through fsspec and named as
    ``root`` is (``memory://run/checkpoints/last.ckpt``). ``fallbacks`` appends the run's other
    ``*.ckpt`` (ModelCheckpoint's top-k), newest first: where the newest is corrupt, the previous good
    one may be one of them.
    """
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")

    def found(pattern: str) -> list[str]:
        return [p for p in fs.glob(f"{glob.escape(base)}/{pattern}") if fs.isfile(p)]

    def newest_first(paths: list[str]) -> list[str]:
        ranked = sorted(
            set(paths), key=lambda p: (modified(fs, p), posixpath.basename(p).startswith("hpc_ckpt_"))
        )
        return [join_path(root, p[len(base) + 1 :]) for p in reversed(ranked)]

    primary = newest_first([*found("hpc_ckpt_*.ckpt"), *found("**/last*.ckpt")])
    if not fallbacks:
        return primary
    return primary + [p for p in newest_first(found("**/*.ckpt")) if p not in primary]


def modified(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """When ``path`` last changed, in seconds since the epoch (0 where the file system cannot say)."""
    try:
        return float(fs.modified(path).timestamp())
    except NotImplementedError:
        info = fs.info(path)
        return float(info.get("mtime") or 0.0)


def check_input_size(model: ReadoutModule, data: ReadoutDataModule) -> None:
    """Raises ValueError, before any data is read, unless the training crops have the input size the
    readout is built for: its μ/σ and the bottleneck hold one value per position of that input."""
    classifier = model.attributor.classifier
    if data.image_size == classifier.input_size:
        return
    source = "" if model.hparams["input_size"] is not None else f", the default of {classifier.name!r}"
    raise ValueError(
        f"data.image_size is {data.image_size} but model.input_size is {classifier.input_size}{source}: "
        f"the readout's statistics are per position of a {classifier.input_size}-px input. Set "
        f"data.image_size and model.input_size to the same value"
    )


def checkpoint_to_resume(ckpt_path: str | None, root: str, model: ReadoutModule) -> str | None:
    """The checkpoint to resume from, read whole and checked against the model before any data is read.

    'last' takes the newest that loads and can be resumed from, and names each one passed over;
    an explicit path must load itself. Lightning's own keywords ('best', 'hpc', ...) pass unchecked.
    """
    if ckpt_path is None or (ckpt_path != "last" and re.fullmatch(r"[a-z]+", ckpt_path)):
        return ckpt_path
    if ckpt_path != "last":
        model.check_checkpoint(resumable(read_checkpoint(ckpt_path), ckpt_path))
        return ckpt_path
    candidates = resume_candidates(root, fallbacks=True)
    if not candidates:
        return None
    found = first_usable(candidates, rank_zero_warn, check=resumable)
    if found is None:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints under {root} can be resumed from (why is logged "
            "above); pass --ckpt_path null to start over"
        )
    path, checkpoint = found
    model.check_checkpoint(checkpoint)
    return path


def resumable(checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    """The checkpoint itself if it holds a training state (ModelCheckpoint's weights-only ones do not)."""
    missing = [key for key in ("optimizer_states", "loops") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} holds no training state to resume (no {', '.join(missing)})")
    return checkpoint


def main(args: list[str] | None = None) -> ReadoutCLI:
    show_info()
    preemption = Preemption()
    preemption.install_early()  # before anything slow: a signal from here on is remembered, not fatal
    try:
        return run(preemption, args)
    finally:
        preemption.uninstall_early()


def run(preemption: Preemption, args: list[str] | None) -> ReadoutCLI:
    cli = ReadoutCLI(
        ReadoutModule,
        ReadoutDataModule,
        run=False,
        args=args,
        trainer_defaults={"callbacks": [preemption, BadDataGuard(), FinalCheckpoint()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m readout.fit", "description": __doc__.splitlines()[0]},
    )
    trainer = cli.trainer
    preemption.keep_signal_checkpoints = cli.config.keep_signal_checkpoints  # checked by the setter
    check_input_size(cli.model, cli.datamodule)
    ckpt_path = checkpoint_to_resume(cli.config.ckpt_path, trainer.default_root_dir, cli.model)
    explain_observer_kills(trainer)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The classifier is frozen in eval mode on purpose (its batch norms must not move); Lightning
            # counts its modules and warns on every start and resume, which users read as a fault.
            warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", UserWarning)
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        if preemption.received is None:  # Lightning's own handler, before the first training step
            rank_zero_info("stopped by SIGTERM before the first training step: nothing to save")
        return cli  # else preempted: the checkpoint is written and Preemption has said where
    except RuntimeError as error:
        if loader_worker_died(error):
            print(loader_worker_message(trainer, error), file=sys.stderr, flush=True)
        elif trainer.world_size > 1 and not isinstance(error, BadDataError) and from_collective(error):
            print(peer_failure_message(trainer, error), file=sys.stderr, flush=True)
        raise
    if trainer.is_global_zero and not trainer.interrupted:
        out = cli.config.export_dir or join_path(trainer.default_root_dir, "export")
        training = {
            "command": shlex.join(["python", "-m", "readout.fit", *(sys.argv[1:] if args is None else args)]),
            "config": cli.config.as_dict(),
            "steps": trainer.global_step,
            "minutes": round((time.perf_counter() - started) / 60, 2),  # this process's share of the run
            "resumed_from": ckpt_path,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        export_module(cli.model, out, training)
        print(f"exported the readout to {out}")
    if preemption.received is not None and not trainer.interrupted and trainer.is_global_zero:
        # SIGTERM or SIGUSR1 after the last step's check (final validation, export): the early handler
        # of main() holds it; the run is complete, so there is nothing to save and no job to requeue.
        print(
            f"{preemption.received} came after the last training step: the run was complete and is "
            "exported; nothing to save or requeue"
        )
    return cli


def from_collective(error: BaseException) -> bool:
    """Whether an error came out of torch.distributed (gloo, NCCL): a peer died or a collective timed out."""
    if isinstance(error, torch.distributed.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    in_distributed = any("torch/distributed/" in frame.filename for frame in frames)
    return in_distributed or re.search(r"gloo|nccl|c10d", str(error), re.IGNORECASE) is not None
