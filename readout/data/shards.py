"""Reading shards: a torch ``IterableDataset`` over webdataset tars on any fsspec filesystem, and its loader.

Batch format (a dict that ``default_collate`` could have built; everything downstream relies on it):

- ``image``: float32 (B, 3, H, W) in [0, 1], not normalised (the classifier normalises).
- ``label``: int64 (B,), the class index.
- ``box_mask``: bool (B, H, W), the union of the sample's boxes after the transform; all False
  where a sample has no box.
- ``mask``: bool (B, H, W), the object's pixel mask after the transform; all False where it has none.
- ``has_mask``: bool (B,), whether ``mask`` is real.
- ``key``: list[str] of the B sample keys.

Shards are named by a brace pattern (``data/train-{000000..000099}.tar``), a glob, a list of patterns,
a directory (its ``manifest.json`` if it has one, else its ``*.tar``) or a manifest; local paths or
any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...), opened through fsspec, not webdataset's
``gopen``. An empty pattern or a missing shard is an error that names the pattern, raised when the
dataset is built.

Modes (rank and world size are given, or read from ``torch.distributed`` when the dataset is built):

- ``train``: each (rank, worker) draws shards with replacement from its own generator, seeded by
  (seed, epoch, rank, worker), shuffles samples through a buffer and yields a fixed number of full
  batches: ``batches_per_epoch`` per rank, split over the workers, so DDP ranks never wait on each other.
  The random transforms are seeded from the same generator, so an epoch is reproducible.
- ``eval``: every sample exactly once across ranks x workers, in shard order: whole shards are dealt
  out when there are at least as many shards as consumers, else every consumer reads all shards and
  keeps every n-th sample. Ranks may get different numbers of batches; the last batch may be short.

A corrupt sample (unreadable image, missing ``cls``, ...) or an unreadable shard (truncated, gone since
the run started) is skipped with a :class:`CorruptSampleWarning` and counted in ``dataset.skips`` by
reason and per shard (shared with the worker processes); ``dataset.health()`` sums them up as a
:class:`ShardHealth`, which says when their share is past a limit and which shards are the worst.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import posixpath
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Literal

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.transforms import v2
from webdataset.filters import batched
from webdataset.tariterators import group_by_keys, tar_file_expander

from readout.data.format import MANIFEST_NAME, SKIP_REASONS, Manifest, SampleError, decode_sample
from readout.data.transforms import eval_transform, train_transform, transform_sample

Mode = Literal["train", "eval"]
ShardSpec = str | os.PathLike[str] | Sequence[str]


class CorruptSampleWarning(UserWarning):
    """A sample or shard was skipped because it could not be read."""


@dataclass(frozen=True)
class ShardList:
    """Resolved shard URLs. pattern: the spec as given (for messages); samples: per shard, if a manifest
    says; classes: class names, if a manifest says."""

    pattern: str
    urls: tuple[str, ...]
    samples: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None

    @property
    def total_samples(self) -> int | None:
        return None if self.samples is None else sum(self.samples)


def resolve_shards(spec: ShardSpec | ShardList) -> ShardList:
    """Expands a pattern, list, directory or manifest into shard URLs and checks that they all exist.

    Raises ValueError (no shard at all) or FileNotFoundError (some missing), naming the pattern.
    """
    if isinstance(spec, ShardList):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    pattern = spec if isinstance(spec, str) else repr(list(spec))
    shards = _expand(spec)
    if not shards.urls:
        raise ValueError(f"no shards found for {pattern!r}")
    missing = _missing(shards.urls)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards.urls)} shards of {pattern!r} do not exist: {shown}"
        )
    return shards


def _expand(spec: str | Sequence[str]) -> ShardList:
    if not isinstance(spec, str):
        urls = [url for item in spec for url in braceexpand.braceexpand(item)]
        return ShardList(repr(list(spec)), tuple(urls))
    if not spec.strip():
        return ShardList(spec, ())
    if spec.endswith(".json"):
        return _from_manifest(spec, spec)
    fs, path = fsspec.core.url_to_fs(spec)
    if any(char in spec for char in "*?"):
        return ShardList(spec, _with_protocol(fs, sorted(fs.glob(path))))
    if fs.isdir(path):
        if fs.exists(posixpath.join(path, MANIFEST_NAME)):
            return _from_manifest(posixpath.join(spec.rstrip("/"), MANIFEST_NAME), spec)
        return ShardList(spec, _with_protocol(fs, sorted(fs.glob(posixpath.join(path, "*.tar")))))
    return ShardList(spec, tuple(braceexpand.braceexpand(spec)))


def _with_protocol(fs: fsspec.AbstractFileSystem, paths: list[str]) -> tuple[str, ...]:
    """Paths listed by ``fs`` as URLs that fsspec opens again (local paths stay plain)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return tuple(paths if "file" in protocols else [fs.unstrip_protocol(p) for p in paths])


def _from_manifest(url: str, pattern: str) -> ShardList:
    manifest = Manifest.read(url)
    base = posixpath.dirname(url)
    urls = tuple(posixpath.join(base, shard.name) if base else shard.name for shard in manifest.shards)
    counts = tuple(shard.samples for shard in manifest.shards)
    return ShardList(pattern, urls, counts, tuple(manifest.classes))


def _missing(urls: Sequence[str]) -> list[str]:
    """The URLs that do not exist; one listing per directory, ``exists`` only for what it lacks."""
    listings: dict[tuple[int, str], set[str]] = {}
    missing = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        parent = posixpath.dirname(path)
        key = (id(fs), parent)
        if key not in listings:
            try:
                listings[key] = set(fs.ls(parent, detail=False))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                listings[key] = set()
        if path not in listings[key] and not fs.exists(path):
            missing.append(url)
    return missing


@dataclass(frozen=True)
class ShardHealth:
    """What a dataset has read so far. good: samples decoded; bad: samples skipped plus errors of shards
    (a missing shard counts one per attempt to read it, a truncated one per error it raises);
    reasons: skip reason -> count; by_shard: URL -> bad."""

    good: int
    bad: int
    reasons: dict[str, int]
    by_shard: dict[str, int]

    @property
    def share(self) -> float:
        """bad / (good + bad), 0 before anything was read."""
        return self.bad / max(self.good + self.bad, 1)

    def worst(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` shards with the most skips, most first."""
        return sorted(self.by_shard.items(), key=lambda item: (-item[1], item[0]))[:n]

    def verdict(self, max_share: float) -> str | None:
        """A message when the share of bad samples is past ``max_share``, else None.

        The share is judged once 10 / max_share samples have been read (1000 at 1%): by then a data set
        right at the limit has shown about 10 bad ones, so a few early bad samples cannot stop a run.
        """
        read = self.good + self.bad
        if max_share >= 1 or self.bad == 0 or self.share <= max_share:
            return None
        if max_share > 0 and read < 10 / max_share:
            return None
        worst = ", ".join(f"{url} ({count} bad)" for url, count in self.worst())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items()))
        return (
            f"{self.bad} of {read} samples read ({self.share:.1%}) were bad, more than "
            f"data.max_bad_share = {max_share:g}. Worst shards: {worst}. Reasons: {reasons}. "
            "Fix or drop those shards, or raise data.max_bad_share."
        )


class SkipCounter:
    """How many samples (or shards) were skipped, by reason; shared by the DataLoader's worker processes."""

    def __init__(self, urls: Sequence[str] = ()) -> None:
        self._values = {reason: mp.Value("q", 0) for reason in SKIP_REASONS}
        self.urls = tuple(urls)
        self._index = {url: i for i, url in enumerate(self.urls)}
        self._by_shard = mp.Array("q", max(len(self.urls), 1))

    def add(self, reason: str, url: str | None = None) -> None:
        value = self._values[reason]
        with value.get_lock():
            value.value += 1
        index = self._index.get(url) if url is not None else None
        if index is not None:
            with self._by_shard.get_lock():
                self._by_shard[index] += 1

    def by_shard(self) -> dict[str, int]:
        """URL -> skips, only the shards that had any."""
        return {url: count for url, count in zip(self.urls, self._by_shard[:], strict=False) if count}

    def counts(self) -> dict[str, int]:
        """Reason -> count, only the reasons that occurred."""
        return {reason: value.value for reason, value in self._values.items() if value.value}

    @property
    def total(self) -> int:
        return sum(self.counts().values())


class ShardDataset(IterableDataset):
    """Batches (see the module docstring) from shards; use through :func:`make_loader` (``batch_size=None``).

    In train mode ``len()`` is the number of batches per rank and epoch; ``batches_per_epoch`` defaults to
    the samples a manifest lists // (world_size * batch_size). Call ``set_epoch`` each epoch for a new
    order; without it each dataset copy counts its own iterations.
    """

    def __init__(
        self,
        shards: ShardSpec | ShardList,
        mode: Mode,
        batch_size: int,
        transform: v2.Transform | None = None,
        *,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = resolve_shards(shards)
        self.mode = mode
        self.batch_size = batch_size
        self.transform = transform or (train_transform() if mode == "train" else eval_transform())
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.batches_per_epoch = self._batches_per_epoch(batches_per_epoch) if mode == "train" else None
        self.skips = SkipCounter(self.shards.urls)
        self._good = mp.Value("q", 0)
        self._current_url: str | None = None
        self._epoch = mp.Value("q", -1)
        self._iterations = 0

    def _batches_per_epoch(self, requested: int | None) -> int:
        if requested is None:
            total = self.shards.total_samples
            if total is None:
                raise ValueError(
                    f"batches_per_epoch is needed for {self.shards.pattern!r}: "
                    "no manifest says how many samples it holds"
                )
            requested = total // (self.world_size * self.batch_size)
        if requested < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {requested} for {self.shards.pattern!r}")
        return requested

    def health(self) -> ShardHealth:
        """Samples decoded and skipped so far, in this process and its loader workers."""
        return ShardHealth(self._good.value, self.skips.total, self.skips.counts(), self.skips.by_shard())

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the train order; seen by worker processes too."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError(
                "an eval ShardDataset has no fixed length: ranks may get different numbers of batches"
            )
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._epoch.value if self._epoch.value >= 0 else self._iterations
        self._iterations += 1
        if self.mode == "train":
            return self._train_batches(epoch, worker, workers)
        return self._eval_batches(worker, workers)

    def _train_batches(self, epoch: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        # Drawn, shuffled and augmented here, not by webdataset's ResampledShards, detshuffle and shuffle:
        # one generator of (seed, epoch, rank, worker) feeds the shard draws, the buffer and each sample's
        # augmentation, so that a resumed epoch (resume.py) replays exactly; detshuffle seeds from seed +
        # epoch alone (one order on every rank and worker) and ResampledShards takes its rank from RANK or
        # torch.distributed rather than the one given. Batched here, not by webdataset's batched: that one
        # hands a batch out only after reading the next sample, one decode past the epoch's quota.
        assert self.batches_per_epoch is not None
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        if quota == 0:
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        batch: list[dict[str, Any]] = []
        with closing(_shuffled(self._resampled(rng), self.shuffle_buffer, rng)) as raw_samples:
            for raw in raw_samples:
                sample = self._decode(raw)
                if sample is None:
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(rng.integers(2**62)))
                    batch.append(self.element(sample))
                if len(batch) == self.batch_size:
                    yield default_collate(batch)
                    batch, quota = [], quota - 1
                    if quota == 0:
                        return

    def _resampled(self, rng: np.random.Generator) -> Generator[dict[str, Any]]:
        """Raw samples of shards drawn with replacement, forever; an error if nothing can be read."""
        urls, unreadable_in_a_row = self.shards.urls, 0
        while True:
            count = 0
            for raw in self._read([urls[int(rng.integers(len(urls)))]]):
                count += 1
                yield raw
            unreadable_in_a_row = 0 if count else unreadable_in_a_row + 1
            if unreadable_in_a_row > 2 * len(urls) + 8:
                raise RuntimeError(
                    f"no readable sample in {unreadable_in_a_row} shards of {self.shards.pattern!r}"
                )

    def _eval_batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        elements = self._eval_elements(worker, workers)
        return batched(self.batch_size, collation_fn=default_collate, partial=True)(elements)

    def _eval_elements(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """This consumer's elements, in shard order.

        Split here, not by webdataset's split_by_node and split_by_worker: they take the rank from RANK or
        torch.distributed, not the one given (an evaluation may run its ranks in one process), and give
        nothing to the consumers past the number of shards, where this reader deals out samples instead.
        """
        consumers, me = self.world_size * workers, self.rank * workers + worker
        urls = self.shards.urls
        split_samples = len(urls) < consumers
        mine = urls if split_samples else urls[me::consumers]
        for index, raw in enumerate(self._read(mine)):
            if split_samples and index % consumers != me:
                continue
            sample = self._decode(raw)
            if sample is not None:
                yield self.element(sample)

    def _read(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Raw samples (member suffix -> bytes, plus ``__key__``, ``__url__``) of the shards, in order."""
        streams = self._tracked(_open_streams(urls, self._on_shard_error))
        files = tar_file_expander(streams, handler=self._on_shard_error)
        return group_by_keys(files, handler=self._on_shard_error)

    def _tracked(self, streams: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The streams, remembering whose shard is being read: a tar error does not always name it."""
        for source in streams:
            self._current_url = source["url"]
            yield source

    def _on_shard_error(self, error: Exception) -> bool:
        named = [arg for arg in error.args if isinstance(arg, str) and arg in self.skips.urls]
        self.skips.add("bad_shard", named[-1] if named else self._current_url)
        warnings.warn(f"skipping the rest of a shard: {error}", CorruptSampleWarning, stacklevel=2)
        return True

    def decode(self, raw: dict[str, Any]) -> Any:
        """A raw sample (member suffix -> bytes) -> what :meth:`element` takes. Raises
        :class:`SampleError` to have the sample skipped and counted; subclasses may defer the decode."""
        return decode_sample(raw)

    def element(self, decoded: Any) -> dict[str, Any]:
        """What :meth:`decode` gave -> one element of a batch; in train mode under the sample's seed."""
        return transform_sample(decoded, self.transform)

    def _decode(self, raw: dict[str, Any]) -> Any:
        try:
            sample = self.decode(raw)
        except SampleError as error:
            self.skips.add(error.reason, raw.get("__url__"))
            warnings.warn(f"skipping {error}", CorruptSampleWarning, stacklevel=2)
            return None
        with self._good.get_lock():
            self._good.value += 1
        return sample


def _open_streams(urls: Iterable[str], on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` per shard, opened with fsspec and closed when the next one is asked for."""
    for url in urls:
        try:
            opened = fsspec.open(url, "rb").open()
        except Exception as error:
            error.args = (*error.args, url)
            on_error(error)
            continue
        with opened:
            yield {"url": url, "stream": opened}


def _shuffled(
    items: Generator[dict[str, Any]], size: int, rng: np.random.Generator
) -> Generator[dict[str, Any]]:
    """Shuffles a stream through a buffer of ``size`` items (webdataset's shuffle, own generator)."""
    buffer: list[dict[str, Any]] = []
    with closing(items):
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], item = item, buffer[i]
            yield item
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def make_loader(
    shards: ShardSpec | ShardList,
    mode: Mode,
    batch_size: int,
    num_workers: int = 4,
    *,
    transform: v2.Transform | None = None,
    seed: int = 0,
    batches_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> DataLoader:
    """A DataLoader of batches (see the module docstring); ``loader.dataset.skips`` counts skipped samples.

    transform: defaults to ``train_transform()`` / ``eval_transform()`` (ImageNet sizes: 224 crops).
    In train mode ``len(loader)`` is ``batches_per_epoch``, the same on every rank.
    """
    dataset = ShardDataset(
        shards,
        mode,
        batch_size,
        transform,
        seed=seed,
        batches_per_epoch=batches_per_epoch,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
