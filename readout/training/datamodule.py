"""The Lightning data module of ``readout.fit``: shards in, batches of the data layer's format out.

Its training loader resumes part-way into an epoch without decoding the batches already done
(:mod:`readout.data.resume`) and can decode JPEG batches on the device
(:mod:`readout.data.device_decode`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from readout.data.device_decode import DeviceTrainTransform, check_jpeg_shards
from readout.data.resume import ResumableShards, ResumedLoader, TrainLoader
from readout.data.shards import ShardSpec, make_loader, resolve_shards
from readout.data.teacher import TeacherMaps
from readout.data.transforms import eval_transform, train_transform


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: workers ignore SIGUSR1 and SIGTERM, the trainer handles them.

    SLURM signals every process of a job step, and forked workers inherit Lightning's handlers: each
    would save a checkpoint from its stale copy of the model (over the trainer's, under the same
    name) and requeue the job again (SIGUSR1), or broadcast on a copy of the process group (SIGTERM).
    Dying instead would abort the trainer's graceful stop; it shuts its workers down itself.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_workers(num_workers: int | str, environ: Mapping[str, str] = os.environ) -> None:
    """Raises ValueError where ``num_workers`` loader processes and the rank's own would need more
    cores than SLURM gave the task (``--cpus-per-task``); ``auto`` always fits."""
    allotted = environ.get("SLURM_CPUS_PER_TASK")
    if not allotted or not isinstance(num_workers, int) or num_workers < int(allotted):
        return
    raise ValueError(
        f"data.num_workers is {num_workers}: with the rank's own process that is {num_workers + 1} busy "
        f"processes on the {allotted} cores of --cpus-per-task={allotted}. Set data.num_workers auto "
        f"({int(allotted) - 1} here) or at most {int(allotted) - 1}, or ask for more cores"
    )


def auto_workers(devices_per_node: int, environ: Mapping[str, str] = os.environ) -> int:
    """Loader workers per rank for ``num_workers: auto``: the CPU cores this rank may use, less one for
    the rank's own process.

    The cores are those of this process's affinity mask, shared by the ``devices_per_node`` ranks that
    Lightning starts on a node; under SLURM a task is allotted ``SLURM_CPUS_PER_TASK`` of its own
    (srun starts one task per device, and may or may not bind it to them).
    """
    cores = len(os.sched_getaffinity(0))
    allotted = environ.get("SLURM_CPUS_PER_TASK")
    per_rank = min(cores, int(allotted)) if allotted else cores // max(devices_per_node, 1)
    return max(per_rank - 1, 0)


class ReadoutDataModule(pl.LightningDataModule):
    """Webdataset shards for training the readout.

    Batches reach the device through Lightning's ``transfer_batch_to_device``, whose
    ``move_data_to_device`` copies every tensor with ``non_blocking=True`` to any device but the CPU
    (and MPS); with ``pin_memory`` (the default) the loader's batches lie in pinned host memory, so
    those copies run asynchronously, overlapping the step queued before them.

    Args:
        train_shards: brace pattern, list, directory or manifest of training shards (any fsspec URL).
        val_shards: the same for validation; none disables validation.
        batch_size: images per process and step (the paper: 16 per GPU).
        num_workers: loader processes per rank; ``auto``: the cores of this rank, less one
            (:func:`auto_workers`; on a node of 16 cores and 1 GPU, 15). The training order depends on
            the count, so a run resumed from a checkpoint keeps the count it started with under
            ``auto`` (on a node with other cores too), and warns where a number given differs.
        image_size: side of the crops fed to the classifier (224 for ImageNet, 64 for the synthetic set).
        resize: shorter side before the centre crop in validation (256 for ImageNet).
        min_scale: smallest area share of RandomResizedCrop in training.
        batches_per_epoch: batches per rank and epoch (default: the manifest's samples / global batch).
        shuffle_buffer: samples in the shuffle buffer of each worker.
        seed: seed of the shard order, the shuffle and the random crops.
        pin_memory: pin host memory, so that the copies to the GPU are asynchronous (no effect on the CPU;
            turn it off there to avoid PyTorch's warning).
        max_bad_share: the run stops once more than this share of the training samples read were
            skipped as corrupt (judged after 10/max_bad_share samples); 1 never stops.
        decode: where training images are decoded. ``cpu``: in the loader workers (PIL), with the
            train transform. ``device``: the workers read only the JPEG headers and draw the crops;
            after the copy to the device the batch is decoded there in one call (nvJPEG on CUDA) and
            cropped (:class:`DeviceTrainTransform`; the same crops as ``cpu`` under the same seed).
            Needs JPEG shards; validation and the μ/σ estimate decode on the CPU either way.
        teacher: a teacher file of the training shards (``python -m readout.tools.teacher``): each training
            sample then carries its Per-Sample map, cropped and flipped as its image, for
            ``model.distill_weight``. Needs ``decode: cpu``.
    """

    def __init__(
        self,
        train_shards: ShardSpec,
        # Not ShardSpec: with os.PathLike in the union, jsonargparse reads `--data.val_shards null` as
        # the path 'None' instead of turning validation off.
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 16,
        num_workers: int | Literal["auto"] = "auto",
        image_size: int = 224,
        resize: int = 256,
        min_scale: float = 0.08,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        pin_memory: bool = True,
        max_bad_share: float = 0.01,
        decode: Literal["cpu", "device"] = "cpu",
        teacher: str | None = None,
    ) -> None:
        super().__init__()
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"data.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        check_workers(num_workers)
        if not 0 <= max_bad_share <= 1:
            raise ValueError(f"data.max_bad_share must be in [0, 1], got {max_bad_share}")
        if decode not in ("cpu", "device"):
            raise ValueError(f"data.decode must be 'cpu' or 'device', got {decode!r}")
        # Fail before any model or data work: a missing shard names its field and pattern here.
        for field, shards in (("train_shards", train_shards), ("val_shards", val_shards)):
            try:
                if shards is not None:
                    resolve_shards(shards)
            except (ValueError, FileNotFoundError) as error:
                raise type(error)(f"data.{field}: {error}") from error
        self.max_bad_share = max_bad_share
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resumed_workers: int | None = None
        self.image_size, self.resize, self.min_scale = image_size, resize, min_scale
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer, self.seed, self.pin_memory = shuffle_buffer, seed, pin_memory
        try:
            self.teacher = TeacherMaps(teacher) if teacher is not None else None
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"data.teacher: {error}") from error
        if self.teacher is not None and decode != "cpu":
            raise ValueError("data.teacher needs data.decode cpu (the crops are applied to the maps there)")
        self.device_transform = None
        if decode == "device":
            self.device_transform = DeviceTrainTransform(image_size, scale=(min_scale, 1.0))
            check_jpeg_shards(train_shards)

    @property
    def workers(self) -> int:
        """Loader processes per rank: ``num_workers``; for ``auto``, the count of the checkpoint resumed
        from, else :func:`auto_workers` of the trainer's devices per node (1 without a trainer)."""
        if self.num_workers != "auto":
            return self.num_workers
        if self.resumed_workers is not None:
            return self.resumed_workers
        return auto_workers(self.trainer.num_devices if self.trainer is not None else 1)

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.workers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the worker count of the run resumed (each worker draws its own share of the order)."""
        self.resumed_workers = state_dict.get("num_workers")
        if self.num_workers != "auto" and self.resumed_workers not in (None, self.num_workers):
            rank_zero_warn(
                f"data.num_workers is {self.num_workers}, the checkpoint's run used {self.resumed_workers}: "
                "the resumed run reads the data in another order than an uninterrupted one would "
                "(data.num_workers auto keeps the checkpoint's count)"
            )

    def _eval_loader(self, shards: ShardSpec) -> DataLoader:
        loader = make_loader(
            shards,
            "eval",
            self.batch_size,
            self.workers,
            transform=eval_transform(self.resize, self.image_size),
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        loader.worker_init_fn = leave_signals_to_the_trainer
        return loader

    def train_dataloader(self) -> DataLoader:
        dataset = ResumableShards(
            self.train_shards,
            "train",
            self.batch_size,
            train_transform(self.image_size, scale=(self.min_scale, 1.0)),
            seed=self.seed,
            batches_per_epoch=self.batches_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            device_transform=self.device_transform,
            teacher=self.teacher,
        )
        loader = TrainLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.workers > 0,
            worker_init_fn=leave_signals_to_the_trainer,
        )
        position = self.resume_position(len(loader))
        if position is None:
            return loader
        epoch, done = position
        # Lightning iterates the loader before on_train_epoch_start, where the epoch is set otherwise.
        loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        return ResumedLoader(loader, done) if done else loader

    def resume_position(self, batches_per_epoch: int) -> tuple[int, int] | None:
        """(epoch, batches of it already trained on) of a run restored from a checkpoint, else None.

        Lightning restores its loops before it asks for the train loader; a batch counts as done once
        its optimiser step is (``processed``), which is where Lightning's own loop resumes.
        """
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return None
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
        return (epoch + 1, 0) if done >= batches_per_epoch else (epoch, done)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.device_transform is None or "jpeg" not in batch:
            return batch
        # the crops as lists on the host: reading them back from the device would wait for its queue
        return {**batch, "crop": batch["crop"].tolist(), "flip": batch["flip"].tolist()}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.device_transform is None or "jpeg" not in batch:
            return batch
        return self.device_transform.apply(batch, batch["label"].device)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_shards is None else self._eval_loader(self.val_shards)

    def estimate_dataloader(self) -> DataLoader:
        """Training images under the evaluation transform, for μ/σ before the first step."""
        return self._eval_loader(self.train_shards)
