"""The Lightning data module of ``readout.fit``: shards in, batches of the data layer's format out."""

from __future__ import annotations

import signal
from collections.abc import Sequence

import pytorch_lightning as pl
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

from readout.data.shards import ShardSpec, make_loader, resolve_shards
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


class ResumedLoader(DataLoader):
    """The train loader of a run resumed part-way into an epoch: its first iteration skips ``skip``
    batches, so the run trains on the rest of the epoch an uninterrupted run would have seen."""

    def __init__(self, loader: DataLoader, skip: int) -> None:
        super().__init__(
            loader.dataset,
            batch_size=None,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            worker_init_fn=loader.worker_init_fn,
        )
        self.skip = skip

    def __iter__(self) -> _BaseDataLoaderIter:
        iterator = super().__iter__()
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator


class ReadoutDataModule(pl.LightningDataModule):
    """Webdataset shards for training the readout.

    Args:
        train_shards: brace pattern, list, directory or manifest of training shards (any fsspec URL).
        val_shards: the same for validation; none disables validation.
        batch_size: images per process and step (the paper: 16 per GPU).
        num_workers: loader processes per rank.
        image_size: side of the crops fed to the classifier (224 for ImageNet, 64 for the synthetic set).
        resize: shorter side before the centre crop in validation (256 for ImageNet).
        min_scale: smallest area share of RandomResizedCrop in training.
        batches_per_epoch: batches per rank and epoch (default: the manifest's samples / global batch).
        shuffle_buffer: samples in the shuffle buffer of each worker.
        seed: seed of the shard order, the shuffle and the random crops.
        pin_memory: pin host memory for faster copies to the GPU.
        max_bad_share: the run stops once more than this share of the training samples read were
            skipped as corrupt (judged after 10/max_bad_share samples); 1 never stops.
    """

    def __init__(
        self,
        train_shards: ShardSpec,
        # Not ShardSpec: with os.PathLike in the union, jsonargparse reads `--data.val_shards null` as
        # the path 'None' instead of turning validation off.
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 8,
        image_size: int = 224,
        resize: int = 256,
        min_scale: float = 0.08,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        pin_memory: bool = True,
        max_bad_share: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0 <= max_bad_share <= 1:
            raise ValueError(f"data.max_bad_share must be in [0, 1], got {max_bad_share}")
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
        self.image_size, self.resize, self.min_scale = image_size, resize, min_scale
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer, self.seed, self.pin_memory = shuffle_buffer, seed, pin_memory

    def _eval_loader(self, shards: ShardSpec) -> DataLoader:
        loader = make_loader(
            shards,
            "eval",
            self.batch_size,
            self.num_workers,
            transform=eval_transform(self.resize, self.image_size),
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        loader.worker_init_fn = leave_signals_to_the_trainer
        return loader

    def train_dataloader(self) -> DataLoader:
        loader = make_loader(
            self.train_shards,
            "train",
            self.batch_size,
            self.num_workers,
            transform=train_transform(self.image_size, scale=(self.min_scale, 1.0)),
            seed=self.seed,
            batches_per_epoch=self.batches_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            pin_memory=self.pin_memory,
        )
        loader.worker_init_fn = leave_signals_to_the_trainer
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

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_shards is None else self._eval_loader(self.val_shards)

    def estimate_dataloader(self) -> DataLoader:
        """Training images under the evaluation transform, for μ/σ before the first step."""
        return self._eval_loader(self.train_shards)
