"""The shard reader: round trip, exactly-once eval, equal train batches, fsspec URLs, clear errors, skips."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds

from readout.data import shards as shards_module
from readout.data.format import Manifest, encode_png, encode_sample
from readout.data.shards import CorruptSampleWarning, ShardDataset, make_loader, resolve_shards
from readout.data.synthetic import generate, write_shards
from readout.data.transforms import eval_transform, train_transform

IDENTITY = eval_transform(resize=None, crop=None)


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_round_trip_gives_the_generated_samples(tiny_shards: Path) -> None:
    source = Manifest.read(str(tiny_shards / "manifest.json")).source
    expected = list(generate(source["n"], source["size"], source["seed"]))
    batches = list(make_loader(tiny_shards, "eval", 5, num_workers=0, transform=IDENTITY))
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 5, 4]  # one consumer: batches span shards
    keys = [key for b in batches for key in b["key"]]
    assert keys == [s.key for s in expected]
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    box_masks = torch.cat([b["box_mask"] for b in batches])
    for i, sample in enumerate(expected):
        assert labels[i] == sample.label
        torch.testing.assert_close(images[i], torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255)
        assert torch.equal(masks[i], torch.from_numpy(sample.mask))
        x0, y0, x1, y1 = sample.bbox
        expected_box = torch.zeros_like(box_masks[i])
        expected_box[y0:y1, x0:x1] = True
        assert torch.equal(box_masks[i], expected_box)
    assert torch.cat([b["has_mask"] for b in batches]).all()


@pytest.mark.parametrize("shard_size", [8, 4], ids=["fewer-shards-than-consumers", "more-shards"])
def test_eval_covers_every_sample_exactly_once_over_2_ranks_x_2_workers(
    tmp_path: Path, shard_size: int
) -> None:
    write_shards(tmp_path, n=24, size=32, seed=0, shard_size=shard_size)
    keys = []
    for rank in range(2):
        loader = make_loader(tmp_path, "eval", 4, num_workers=2, transform=IDENTITY, rank=rank, world_size=2)
        keys += _keys(loader)
    assert Counter(keys) == Counter(s.key for s in generate(24, 32, seed=0))


def test_train_gives_every_rank_the_same_number_of_full_batches(tiny_shards: Path) -> None:
    transform = train_transform(32, scale=(0.5, 1.0))
    per_rank = []
    for rank in range(2):
        loader = make_loader(
            tiny_shards,
            "train",
            4,
            num_workers=2,
            transform=transform,
            rank=rank,
            world_size=2,
            batches_per_epoch=5,
            shuffle_buffer=16,
        )
        assert len(loader) == 5
        batches = list(loader)
        assert all(len(b["key"]) == 4 and b["image"].shape == (4, 3, 32, 32) for b in batches)
        per_rank.append(len(batches))
    assert per_rank == [5, 5]


def test_train_default_length_comes_from_the_manifest(tiny_shards: Path) -> None:
    dataset = ShardDataset(tiny_shards, "train", 4, rank=1, world_size=2)
    assert len(dataset) == 24 // (2 * 4)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        ShardDataset(str(tiny_shards / "synthetic-{000000..000002}.tar"), "train", 4)


def test_train_order_is_fixed_by_seed_and_epoch(tiny_shards: Path) -> None:
    def epoch_keys(epoch: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
        dataset = ShardDataset(
            tiny_shards, "train", 4, train_transform(32), seed=seed, batches_per_epoch=3, shuffle_buffer=16
        )
        dataset.set_epoch(epoch)
        batches = list(dataset)
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    keys, images = epoch_keys(0)
    again, images_again = epoch_keys(0)
    assert keys == again and torch.equal(images, images_again)
    assert epoch_keys(1)[0] != keys and epoch_keys(0, seed=1)[0] != keys


def _train_keys(
    shards: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    rank: int = 0,
    worker: int | None = None,
    shuffle_buffer: int = 16,
) -> list[str]:
    """The keys one (rank, worker) reads in epoch 0: 6 batches of 4 over 2 ranks (x 2 workers if given)."""
    dataset = ShardDataset(
        shards, "train", 4, IDENTITY, seed=0, batches_per_epoch=12 if worker is not None else 6,
        shuffle_buffer=shuffle_buffer, rank=rank, world_size=2,
    )  # fmt: skip
    dataset.set_epoch(0)
    if worker is not None:  # what a DataLoader worker process sees
        info = SimpleNamespace(id=worker, num_workers=2)
        monkeypatch.setattr(shards_module, "get_worker_info", lambda: info)
    keys = [key for batch in dataset for key in batch["key"]]
    monkeypatch.undo()
    return keys


def test_train_seeds_differ_per_rank_and_per_worker(
    tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranks = [_train_keys(tiny_shards, monkeypatch, rank=rank) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 24 and ranks[0] != ranks[1]
    assert _train_keys(tiny_shards, monkeypatch, rank=1) == ranks[1]  # and are fixed
    workers = [_train_keys(tiny_shards, monkeypatch, rank=1, worker=w) for w in range(2)]
    assert len(workers[0]) == len(workers[1]) == 24 and workers[0] != workers[1]
    # Real worker processes read those streams: the loader deals batches round-robin over its workers.
    loader = make_loader(tiny_shards, "train", 4, num_workers=2, transform=IDENTITY, batches_per_epoch=12,
                         shuffle_buffer=16, rank=1, world_size=2, persistent_workers=False)  # fmt: skip
    loader.dataset.set_epoch(0)
    batches = [batch["key"] for batch in loader]
    assert [k for b in batches[0::2] for k in b] == workers[0]
    assert [k for b in batches[1::2] for k in b] == workers[1]


def test_the_shuffle_buffer_mixes_shards(tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a buffer of 1 the samples come as drawn: whole shards (8 samples each) in their own order.
    shard_keys = [[s.key for s in generate(8, 32, seed=0, start=8 * j)] for j in range(3)]
    unshuffled = _train_keys(tiny_shards, monkeypatch, shuffle_buffer=1)
    runs = [unshuffled[i : i + 8] for i in range(0, len(unshuffled), 8)]
    assert all(run in shard_keys for run in runs)
    shuffled = _train_keys(tiny_shards, monkeypatch, shuffle_buffer=16)
    runs = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert not any(run in shard_keys for run in runs)
    assert shuffled == _train_keys(tiny_shards, monkeypatch, shuffle_buffer=16)  # same seed and epoch


def test_fsspec_memory_urls_work_as_pattern_directory_and_manifest(tiny_shards: Path) -> None:
    fs = fsspec.filesystem("memory")
    for path in tiny_shards.iterdir():
        fs.pipe(f"/tiny/{path.name}", path.read_bytes())
    try:
        expected = _keys(make_loader(tiny_shards, "eval", 8, num_workers=0, transform=IDENTITY))
        for spec in (
            "memory://tiny/synthetic-{000000..000002}.tar",
            "memory://tiny",
            "memory://tiny/manifest.json",
        ):
            assert _keys(make_loader(spec, "eval", 8, num_workers=0, transform=IDENTITY)) == expected, spec
    finally:
        fs.rm("/tiny", recursive=True)


def test_missing_shards_and_empty_patterns_are_errors_that_name_the_pattern(
    tmp_path: Path, tiny_shards: Path
) -> None:
    pattern = str(tiny_shards / "synthetic-{000000..000005}.tar")
    with pytest.raises(FileNotFoundError, match="3 of 6 shards") as error:
        make_loader(pattern, "eval", 4)
    assert pattern in str(error.value) and "synthetic-000005.tar" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no shards found for .*empty"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"no shards found for '\[\]'"):
        resolve_shards([])
    with pytest.raises(ValueError, match="no shards found for ''"):
        resolve_shards("")
    with pytest.raises(ValueError, match="no shards found for .*nothing-"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="memory://nowhere"):
        resolve_shards("memory://nowhere/shard-{0..1}.tar")


def _jpeg(size: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_corrupt_samples_are_skipped_counted_and_warned_about(tmp_path: Path) -> None:
    good = _jpeg()
    samples = [
        encode_sample("good0", good, "jpg", 1, "one", [(0, 0, 8, 8)], (16, 16)),
        encode_sample("truncated", good[: len(good) // 2], "jpg", 1, "one", [], (16, 16)),
        encode_sample("nocls", good, "jpg", 2, "two", [], (16, 16)),
        encode_sample("badmask", good, "jpg", 2, "two", [], (16, 16), np.zeros((16, 16), bool)),
        encode_sample("good1", good, "jpg", 3, "three", [], (16, 16)),
    ]
    del samples[2]["cls"]
    samples[3]["mask.png"] = encode_png(np.zeros((4, 4), bool))  # wrong size
    with wds.TarWriter(str(tmp_path / "mixed.tar"), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    (tmp_path / "broken.tar").write_bytes((tmp_path / "mixed.tar").read_bytes()[:1500])

    loader = make_loader(str(tmp_path / "mixed.tar"), "eval", 8, num_workers=0, transform=IDENTITY)
    with pytest.warns(CorruptSampleWarning):
        batches = list(loader)
    assert [k for b in batches for k in b["key"]] == ["good0", "good1"]
    assert batches[0]["label"].tolist() == [1, 3]
    assert loader.dataset.skips.counts() == {"unreadable_image": 1, "missing_cls": 1, "bad_mask": 1}

    loader = make_loader(str(tmp_path / "broken.tar"), "eval", 8, num_workers=0, transform=IDENTITY)
    with pytest.warns(CorruptSampleWarning):
        list(loader)
    assert loader.dataset.skips.counts().get("bad_shard") == 1


def test_skip_counts_reach_the_main_process_from_workers(tmp_path: Path, tiny_shards: Path) -> None:
    shutil.copy(tiny_shards / "synthetic-000000.tar", tmp_path / "a.tar")
    good = _jpeg()
    with wds.TarWriter(str(tmp_path / "b.tar"), encoder=False) as writer:
        writer.write(encode_sample("bad", good[:100], "jpg", 0, "zero", [], (16, 16)))
    loader = make_loader(str(tmp_path / "{a,b}.tar"), "eval", 8, num_workers=2, transform=IDENTITY)
    assert len(_keys(loader)) == 8
    assert loader.dataset.skips.counts() == {"unreadable_image": 1}
