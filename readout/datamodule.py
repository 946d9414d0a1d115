"""The Lightning data module of ``readout.fit``: shards in, batches of the data layer's format out.

Also what the training loader adds to the shard reader: a resumed epoch passes over the batches
already trained on without decoding them (:class:`ResumableShards`), and the train transform split so
that JPEGs are decoded, batched, on the device (:class:`DeviceTrainTransform`).
"""

from __future__ import annotations

import os
import posixpath
import signal
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import fsspec
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from readout.data.format import SampleError, ShardSample, check_sample, decode_jpegs
from readout.data.shards import ShardDataset, ShardSpec, make_loader, resolve_shards
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


class ResumableShards(ShardDataset):
    """The training shards of ``readout.fit``: a train-mode :class:`ShardDataset` whose next iteration
    can pass over its first ``skip_batches`` batches (per rank) without decoding or transforming them.

    Passed-over samples go through the reader's own loop (the shard draws, the shuffle buffer and the
    per-sample seeds advance exactly as they would) with :func:`check_sample` in place of the decoder
    and the identity in place of the transform; the batches they make are dropped. So the batches that
    follow are those of an uninterrupted iteration, as long as ``check_sample`` judges every sample
    as decoding would (see there for what it cannot see). Passed-over samples are not counted in
    ``health()``: the run that trained on them counted them.
    """

    #: True while the samples being read are passed over (set per copy: a worker's, or this one).
    passing_over = False

    def __init__(
        self, *args: Any, device_transform: DeviceTrainTransform | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = 0
        """Batches of this rank's next iteration to pass over; consumed by the copy that iterates."""
        self.device_transform = device_transform
        """With one, samples stay JPEG bytes (:class:`RawJpeg`) and batches are decoded on the device."""

    def decode(self, raw: dict[str, Any]) -> Any:
        return super().decode(raw) if self.device_transform is None else raw_jpeg(raw)

    def element(self, decoded: Any) -> dict[str, Any]:
        if isinstance(decoded, RawJpeg) and self.device_transform is not None:
            return self.device_transform.element(decoded)
        return super().element(decoded)

    @property  # type: ignore[override]
    def transform(self) -> v2.Transform:
        """The train transform; the identity while samples are passed over."""
        return PASS_OVER_TRANSFORM if self.passing_over else self._transform

    @transform.setter
    def transform(self, value: v2.Transform) -> None:
        self._transform = value

    def _train_batches(self, epoch: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        # Called from __iter__ as the iteration starts, so the skip is read then, in this copy.
        skip, self.skip_batches = self.skip_batches, 0
        # The loader takes batches round-robin from worker 0 on, so batch p of an epoch is made by worker
        # p % n. Resumed at batch `skip`, loader worker w plays worker (w + skip) % n, which made that
        # many of the batches passed over.
        role = (worker + skip) % workers
        passed = skip // workers + (role < skip % workers)
        batches = super()._train_batches(epoch, role, workers)
        return self._after(batches, passed) if passed else batches

    def _after(self, batches: Iterator[dict[str, Any]], skip: int) -> Iterator[dict[str, Any]]:
        """The batches after the first ``skip``, which are made of passed-over samples."""
        self.passing_over = True
        try:
            for index, batch in enumerate(batches):
                if index == skip - 1:
                    self.passing_over = False  # the generator waits here: the next sample is decoded
                if index >= skip:
                    yield batch
        finally:
            self.passing_over = False

    def _decode(self, raw: dict[str, Any]) -> ShardSample | None:
        if not self.passing_over:
            return super()._decode(raw)
        try:
            label, _ = check_sample(raw)
        except SampleError:
            return None  # skipped, as the decoder would have; the run that read it warned about it
        return ShardSample(raw["__key__"], PASSED_OVER_IMAGE, label, "", [])


#: What a passed-over sample holds: its key and label, a 1-pixel image, no box, no mask.
PASSED_OVER_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
PASS_OVER_TRANSFORM = eval_transform(None, None)


class ResumedLoader(DataLoader):
    """The train loader of a run resumed part-way into an epoch: its first iteration passes over
    ``skip`` batches (:class:`ResumableShards`, before decoding), so the run trains on the rest of the
    epoch an uninterrupted run would have seen."""

    def __init__(self, loader: DataLoader, skip: int) -> None:
        if not isinstance(loader.dataset, ResumableShards):
            raise TypeError(f"ResumedLoader needs ResumableShards, got {type(loader.dataset).__name__}")
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
        dataset = cast(ResumableShards, self.dataset)
        dataset.skip_batches, self.skip = self.skip, 0
        try:
            # Workers start here with their own copy of the dataset (the skip included); without
            # workers the dataset reads it here, as its iteration starts.
            return super().__iter__()
        finally:
            dataset.skip_batches = 0


@dataclass(frozen=True)
class RawJpeg:
    """A training sample whose decode is left to the batch's device: its JPEG bytes, label and (H, W)."""

    key: str
    data: bytes
    label: int
    size: tuple[int, int]


def raw_jpeg(raw: dict[str, Any]) -> RawJpeg:
    """A raw sample (tar member suffix -> bytes) -> :class:`RawJpeg`, reading only the image's header.

    Raises :class:`SampleError` where :func:`check_sample` does, and ValueError for a sample without a
    JPEG: device decode needs JPEG shards.
    """
    label, size = check_sample(raw)
    if "jpg" not in raw:  # then a png: check_sample found an image
        raise ValueError(
            f"data.decode='device' needs JPEG shards, but sample {raw.get('__key__', '?')!r} of "
            f"{raw.get('__url__', '?')} holds png (the synthetic set is stored as PNG): use "
            "data.decode='cpu', or shards written by readout.data.imagenet"
        )
    return RawJpeg(raw["__key__"], raw["jpg"], label, size)


def check_jpeg_shards(shards: ShardSpec) -> None:
    """Raises ValueError (naming ``data.decode``) unless the first sample of the first shard is a JPEG."""
    url = resolve_shards(shards).urls[0]
    key, suffix = "?", "no image"
    with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, _, suffix = posixpath.basename(member.name).partition(".")
            if suffix in ("jpg", "png"):
                break
    if suffix != "jpg":
        raise ValueError(
            f"data.decode='device' needs JPEG shards, but sample {key!r} of {url} holds {suffix} "
            "(the synthetic set is stored as PNG): use data.decode='cpu', or shards written by "
            "readout.data.imagenet"
        )


class DeviceTrainTransform:
    """The train transform (:func:`train_transform`: RandomResizedCrop, then a horizontal flip) with the
    decode moved onto the batch's device.

    In the loader worker, :meth:`element` draws the crop and the flip from the torch generator exactly
    as the CPU transform of the same settings draws them, knowing only the image's size; the batch
    then carries the JPEG bytes. On the device, :meth:`apply` decodes the whole batch in one call
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA) and crops, resizes and flips each image there with
    the CPU transform's own kernels and settings. Only ``image``, ``label`` and ``key`` come out: what
    a training step reads (no boxes or masks).
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
    ) -> None:
        steps = train_transform(size, scale, ratio, flip).transforms
        self.crop = next(step for step in steps if isinstance(step, v2.RandomResizedCrop))
        self.flip = next(step for step in steps if isinstance(step, v2.RandomHorizontalFlip))

    def element(self, sample: RawJpeg) -> dict[str, Any]:
        """One element of a raw batch: jpeg (bytes), label, key, crop (4,) [top, left, h, w], flip ()."""
        height, width = sample.size
        shape_only = tv_tensors.Image(torch.empty(0, height, width, dtype=torch.uint8))
        params = self.crop.make_params([shape_only])
        flipped = bool(torch.rand(1) < self.flip.p)  # v2's random-apply rule, drawn after the crop
        return {
            "jpeg": sample.data,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "key": sample.key,
            "crop": torch.tensor([params[k] for k in ("top", "left", "height", "width")]),
            "flip": torch.tensor(flipped),
        }

    def apply(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A raw batch (``jpeg``: B bytes; ``crop``, ``flip``: tensors or lists) -> image (B, 3, S, S)
        float32 in [0, 1] on ``device``, label, key."""
        crops = batch["crop"].tolist() if isinstance(batch["crop"], torch.Tensor) else batch["crop"]
        flips = batch["flip"].tolist() if isinstance(batch["flip"], torch.Tensor) else batch["flip"]
        images = []
        for image, (top, left, height, width), flipped in zip(
            decode_jpegs(batch["jpeg"], device), crops, flips, strict=True
        ):
            image = F.resized_crop(
                image, top, left, height, width, self.crop.size, self.crop.interpolation,
                antialias=self.crop.antialias,
            )  # fmt: skip
            images.append(F.horizontal_flip(image) if flipped else image)
        image = F.to_dtype(torch.stack(images), torch.float32, scale=True)
        return {"image": image, "label": batch["label"].to(device), "key": batch["key"]}


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
    ) -> None:
        super().__init__()
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"data.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
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
        )
        loader = DataLoader(
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
