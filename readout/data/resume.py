"""A training epoch resumed part-way: the batches already trained on are passed over before decoding.

The reader's own loop runs for them (shard draws, the shuffle buffer and the per-sample seeds advance
as in an uninterrupted run), with header checks in place of the decoder, so a requeue late in an
ImageNet epoch does not re-read the epoch. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter
from torchvision.transforms import v2

from readout.data.device_decode import DeviceTrainTransform, RawJpeg, raw_jpeg
from readout.data.format import SampleError, ShardSample, check_sample
from readout.data.shards import ShardDataset
from readout.data.teacher import TeacherMaps
from readout.data.transforms import eval_transform, transform_sample


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
        self,
        *args: Any,
        device_transform: DeviceTrainTransform | None = None,
        teacher: TeacherMaps | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if teacher is not None and device_transform is not None:
            raise ValueError("teacher maps need data.decode cpu (the crops are applied to them there)")
        self.teacher = teacher
        """With one, each element carries its sample's teacher map (``teacher``), cropped as its image."""
        self.skip_batches = 0
        """Batches of this rank's next iteration to pass over; consumed by the copy that iterates."""
        self.device_transform = device_transform
        """With one, samples stay JPEG bytes (:class:`RawJpeg`) and batches are decoded on the device."""

    def decode(self, raw: dict[str, Any]) -> Any:
        return super().decode(raw) if self.device_transform is None else raw_jpeg(raw)

    def element(self, decoded: Any) -> dict[str, Any]:
        if isinstance(decoded, RawJpeg) and self.device_transform is not None:
            return self.device_transform.element(decoded)
        if self.teacher is not None:
            # a passed-over sample is dropped with its batch: a 1-pixel stand-in keeps batches alike
            map_ = PASSED_OVER_MAP if self.passing_over else self.teacher[decoded.key]
            return transform_sample(decoded, self.transform, map_)
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
PASSED_OVER_MAP = np.zeros((1, 1), dtype=np.float32)


class TrainLoader(DataLoader):
    """The training loader of ``readout.fit``: a DataLoader that tells Lightning it is resumable.

    Its position is not kept in its own state: the data module reads it from the trainer's loop
    when a run is restored (:meth:`readout.training.datamodule.ReadoutDataModule.resume_position`) and
    builds a :class:`ResumedLoader`. ``state_dict``/``load_state_dict`` exist so that Lightning
    recognises the loader as resumable (its ``_Stateful`` protocol) and does not warn, on every
    resume, that the epoch's data will be unreliable; what they store is only this note.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"position": "restored from the fit loop by ReadoutDataModule.resume_position"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None  # the position is the fit loop's, restored before this loader was built


class ResumedLoader(TrainLoader):
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
