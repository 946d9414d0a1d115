"""A callback that deals the training data in a fixed order, for runs whose results are compared across
numbers of processes (the two-node rehearsal in tests/test_slurm_nodes.py).

readout.fit's own training stream draws shards with replacement per rank, so a run on 4 processes
does not see the images a run on 1 process sees. With :class:`OrderedData` in the trainer's callbacks,
the data module's train loader is replaced by one that reads the training shards once, in order, and
deals step s's global batch (samples ``s·G … s·G + G − 1``, G = batch size × world size) out in
contiguous slices of ``data.batch_size``, rank by rank: the global batch of a step is then the same
for any number of processes. A resumed run passes over the batches its epoch has trained on, as the
real loader does (``ReadoutDataModule.resume_position``). It also writes, per rank, a line
``epoch step rank key key ...`` for every batch trained on to ``keys_file`` (``{rank}`` in the name
becomes the rank), so a test can see which samples were seen, by whom, before and after a requeue.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

from readout.data.shards import make_loader
from readout.data.transforms import eval_transform


class Dealt(IterableDataset):
    """This rank's batches of an epoch, in order; the first iteration starts at batch ``skip``."""

    def __init__(self, samples: list[dict[str, Any]], batch_size: int, rank: int, world_size: int) -> None:
        self.samples, self.batch_size, self.rank, self.world_size = samples, batch_size, rank, world_size
        self.skip = 0

    def __len__(self) -> int:
        return len(self.samples) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self.skip = self.skip, 0
        for step in range(skip, len(self)):
            start = (step * self.world_size + self.rank) * self.batch_size
            yield default_collate(self.samples[start : start + self.batch_size])


class OrderedData(pl.Callback):
    def __init__(self, keys_file: str) -> None:
        self.keys_file = keys_file

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = trainer.datamodule  # type: ignore[attr-defined]

        def train_dataloader() -> DataLoader:
            size = data.image_size
            loader = make_loader(
                data.train_shards, "eval", 1, 0, transform=eval_transform(size, size), rank=0, world_size=1
            )
            samples = [{k: v[0] for k, v in batch.items()} for batch in loader]
            dealt = Dealt(samples, data.batch_size, trainer.global_rank, trainer.world_size)
            position = data.resume_position(len(dealt))  # (epoch, batches of it done): every epoch
            if position is not None:  # deals the same order, so only the second part matters
                dealt.skip = position[1]
            return DataLoader(dealt, batch_size=None)

        data.train_dataloader = train_dataloader

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        line = f"{trainer.current_epoch} {trainer.global_step} {trainer.global_rank} {' '.join(batch['key'])}"
        with Path(self.keys_file.format(rank=trainer.global_rank)).open("a") as f:
            f.write(line + "\n")
