"""The data module of readout.fit: a resumed loader passes over the batches done without decoding them."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import tiny_config, write_config
from lightning_fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import DataLoader, default_collate

import readout.data.format as data_format
from readout.data.device_decode import DeviceTrainTransform, raw_jpeg
from readout.data.format import SampleError, check_sample, decode_sample
from readout.data.resume import ResumableShards, ResumedLoader
from readout.data.shards import CorruptSampleWarning, ShardDataset
from readout.data.synthetic import generate, to_record
from readout.data.transforms import train_transform, transform_sample
from readout.training.datamodule import ReadoutDataModule, auto_workers
from readout.training.fit import main as fit

BATCH, BATCHES = 4, 6


def train_loader(shards: Path, workers: int = 0, transform: Any = None, epoch: int = 1) -> DataLoader:
    dataset = ResumableShards(
        shards, "train", BATCH, transform or train_transform(32), seed=3, batches_per_epoch=BATCHES,
        shuffle_buffer=8,
    )  # fmt: skip
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["key"] == theirs["key"]
        for field in ("image", "label", "box_mask", "mask", "has_mask"):
            assert torch.equal(mine[field], theirs[field]), field


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_yields_the_batches_of_an_uninterrupted_one_after_the_skip(tiny_shards, workers):
    """3 of 6 batches done: with 2 workers, worker 0 made batches 0 and 2, worker 1 batch 1. The next
    epoch is whole again."""
    uninterrupted = train_loader(tiny_shards, workers)
    expected = list(uninterrupted)
    resumed = ResumedLoader(train_loader(tiny_shards, workers), skip=3)
    assert_same_batches(list(resumed), expected[3:])
    for loader in (uninterrupted, resumed):
        loader.dataset.set_epoch(2)  # type: ignore[attr-defined]
    assert_same_batches(list(resumed), list(uninterrupted))


def test_passing_over_calls_neither_the_decoder_nor_the_transform(tiny_shards, monkeypatch):
    decoded: list[int] = []
    transformed: list[int] = []
    decode_image, transform = data_format.decode_image, train_transform(32)

    def counting_decode(data: bytes) -> np.ndarray:
        decoded.append(1)
        return decode_image(data)

    def counting_transform(*inputs: Any) -> Any:
        transformed.append(1)
        return transform(*inputs)

    monkeypatch.setattr(data_format, "decode_image", counting_decode)
    resumed = ResumedLoader(train_loader(tiny_shards, transform=counting_transform), skip=4)
    batches = list(resumed)
    assert len(batches) == BATCHES - 4
    assert len(decoded) == len(transformed) == (BATCHES - 4) * BATCH  # tiny_shards hold no bad sample
    assert all(batch["image"].shape == (BATCH, 3, 32, 32) for batch in batches)
    decoded.clear()
    list(train_loader(tiny_shards))  # the reference point: an uninterrupted epoch decodes every sample
    assert len(decoded) == BATCHES * BATCH


def write_tar(path: Path, records: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for record in records:
            writer.write(record)
    return path


def jpeg(record: dict) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(record["png"])).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def as_jpeg(record: dict, data: bytes) -> dict:
    out = {k: v for k, v in record.items() if k != "png"}
    out["jpg"] = data
    return out


def test_passing_over_skips_the_corrupt_samples_that_decoding_skips(tmp_path):
    """A shard of whole samples and one of corrupt ones (PNG and JPEG cut short, no cls, bad json): the
    passed-over part of the epoch holds bad samples, and the batches after it are still exact."""
    good = [to_record(sample) for sample in generate(8, 32, seed=1)]
    bad = [to_record(sample) for sample in generate(8, 32, seed=2)]
    bad[0]["png"] = bad[0]["png"][:200]
    bad[1] = as_jpeg(bad[1], jpeg(bad[1])[:300])
    del bad[2]["cls"]
    bad[3]["json"] = b"{not json"
    bad[4] = as_jpeg(bad[4], jpeg(bad[4]))
    write_tar(tmp_path / "good.tar", good)
    write_tar(tmp_path / "bad.tar", bad)
    skip = 4
    probe = train_loader(tmp_path)
    with pytest.warns(CorruptSampleWarning):
        for _, _ in zip(range(skip), probe, strict=False):
            pass
        expected = list(train_loader(tmp_path))
    assert probe.dataset.health().bad > 0  # type: ignore[attr-defined]
    resumed = ResumedLoader(train_loader(tmp_path), skip=skip)
    with pytest.warns(CorruptSampleWarning):  # the samples decoded after the skip warn as usual
        got = list(resumed)
    assert_same_batches(got, expected[skip:])


def test_check_sample_judges_every_sample_as_decoding_does():
    """decode_sample is the reference: the same SampleError reason, or the same label and size."""
    records = [to_record(sample) for sample in generate(9, 32, seed=4)]
    whole = jpeg(records[1])
    records[1] = as_jpeg(records[1], whole)
    records[2] = as_jpeg(records[2], whole + b"\x00trailing bytes after the end-of-image marker")
    records[3] = as_jpeg(records[3], whole[: len(whole) // 2])
    records[4]["png"] = records[4]["png"][:300]
    records[5]["png"] = b"not an image"
    records[6]["cls"] = b"seven"
    records[7]["json"] = b"[1, 2"
    small = to_record(next(iter(generate(1, 48, seed=5))))
    records[8]["mask.png"] = small["mask.png"]
    outcomes = []
    for record in records:
        try:
            sample = decode_sample(record)
            expected: object = (sample.label, sample.image.shape[:2])
        except SampleError as error:
            expected = error.reason
        try:
            got: object = check_sample(record)
        except SampleError as error:
            got = error.reason
        assert got == expected, record["__key__"]
        outcomes.append(expected)
    reasons = ["unreadable_image", "unreadable_image", "unreadable_image", "bad_cls", "bad_json", "bad_mask"]
    assert outcomes[3:] == reasons and all(isinstance(o, tuple) for o in outcomes[:3])


def test_a_resumed_loader_refuses_a_dataset_that_cannot_pass_over(tiny_shards):
    loader = DataLoader(ShardDataset(tiny_shards, "train", BATCH, batches_per_epoch=2), batch_size=None)
    with pytest.raises(TypeError, match="ResumedLoader needs ResumableShards, got ShardDataset"):
        ResumedLoader(loader, skip=1)


# ------------------------------------------------------------------------------------------------------
# Decode on the batch's device


def jpeg_records(n: int, seed: int) -> list[dict]:
    """Synthetic samples stored as JPEG: raw samples as the reader hands them over."""
    return [as_jpeg(record, jpeg(record)) for record in map(to_record, generate(n, 64, seed=seed))]


def test_device_decode_gives_the_crops_labels_and_pixels_of_the_cpu_path():
    """Under the same per-sample seeds the device path (here on the CPU) draws the CPU transform's crops
    and flips, so it gives the CPU path's images up to the decoders' rounding."""
    records = jpeg_records(8, seed=6)
    cpu, device = train_transform(48, scale=(0.2, 1.0)), DeviceTrainTransform(48, scale=(0.2, 1.0))
    expected, elements = [], []
    for seed, raw in enumerate(records):
        torch.manual_seed(seed)
        expected.append(transform_sample(decode_sample(raw), cpu))
        torch.manual_seed(seed)
        elements.append(device.element(raw_jpeg(raw)))
    raw_batch = default_collate(elements)
    assert isinstance(raw_batch["jpeg"], list) and all(isinstance(d, bytes) for d in raw_batch["jpeg"])
    assert 0 < int(raw_batch["flip"].sum()) < len(records)  # both kinds of sample are in the batch
    batch = device.apply(raw_batch, torch.device("cpu"))
    reference = default_collate(expected)
    assert set(batch) == {"image", "label", "key"}
    assert batch["image"].shape == (8, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert torch.equal(batch["label"], reference["label"]) and batch["key"] == reference["key"]
    # the two libjpeg builds differ by a level at most, the resize by one more
    assert (batch["image"] - reference["image"]).abs().max() <= 2 / 255 + 1e-6


@pytest.mark.gpu
def test_device_decode_on_a_gpu_gives_the_cpu_path_nearly():
    records = jpeg_records(8, seed=7)
    transform = DeviceTrainTransform(48)
    elements = []
    for seed, raw in enumerate(records):
        torch.manual_seed(seed)
        elements.append(transform.element(raw_jpeg(raw)))
    on_gpu = transform.apply(default_collate(elements), torch.device("cuda"))
    on_cpu = transform.apply(default_collate(elements), torch.device("cpu"))
    assert on_gpu["image"].device.type == "cuda" and on_gpu["label"].device.type == "cuda"
    assert on_gpu["image"].shape == on_cpu["image"].shape == (8, 3, 48, 48)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a few levels at most
    assert (on_gpu["image"].cpu() - on_cpu["image"]).abs().mean() < 3 / 255


def test_device_decode_of_png_samples_is_an_error_that_says_it_needs_jpeg_shards():
    raw = to_record(next(iter(generate(1, 32, seed=0))))
    raw["__url__"] = "data/synthetic-000000.tar"
    with pytest.raises(
        ValueError, match=r"data.decode='device' needs JPEG shards.*holds png.*data.decode='cpu'"
    ):
        raw_jpeg(raw)
    raw["png"] = raw["png"][:100]  # a broken sample is skipped as on the CPU path, before the codec matters
    with pytest.raises(SampleError, match="cannot decode png"):
        raw_jpeg(raw)


# ------------------------------------------------------------------------------------------------------
# Defaults: worker count, pinned memory and non-blocking copies


@pytest.mark.parametrize(
    ("cores", "devices", "slurm_cpus", "expected"),
    [
        (16, 1, None, 15),
        (16, 4, None, 3),
        (16, 4, "8", 7),
        (16, 1, "32", 15),
        (1, 1, None, 0),
        (2, 4, None, 0),
    ],
)
def test_auto_workers_leave_one_core_per_rank(monkeypatch, cores, devices, slurm_cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    environ = {} if slurm_cpus is None else {"SLURM_CPUS_PER_TASK": slurm_cpus}
    assert auto_workers(devices, environ) == expected


def test_num_workers_auto_is_the_default_and_reaches_the_loaders(tiny_shards, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    data = ReadoutDataModule(tiny_shards, tiny_shards, image_size=32, resize=32, batches_per_epoch=2)
    assert data.num_workers == "auto" and data.workers == 2 and data.pin_memory
    assert data.train_dataloader().num_workers == 2 and data.val_dataloader().num_workers == 2
    assert ReadoutDataModule(tiny_shards, num_workers=0).workers == 0
    with pytest.raises(ValueError, match=r"data.num_workers must be 'auto' or an integer >= 0, got -1"):
        ReadoutDataModule(tiny_shards, num_workers=-1)


class RecordedTensor(torch.Tensor):
    """A tensor that records the keyword arguments of ``.to`` instead of moving."""

    calls: list[dict] = []

    def to(self, *args: Any, **kwargs: Any) -> RecordedTensor:  # type: ignore[override]
        RecordedTensor.calls.append(kwargs)
        return self


def test_lightning_copies_batches_to_a_gpu_without_blocking():
    """What the data module's docstring relies on: Lightning's move_data_to_device (the default
    transfer_batch_to_device) asks for non-blocking copies to CUDA, blocking ones to the CPU."""
    batch = {"image": torch.zeros(1).as_subclass(RecordedTensor), "key": ["a"]}
    RecordedTensor.calls = []
    move_data_to_device(batch, torch.device("cuda", 0))  # recorded, not moved: no GPU needed
    move_data_to_device(batch, torch.device("cpu"))
    assert RecordedTensor.calls == [{"non_blocking": True}, {}]


def test_a_resumed_run_keeps_the_worker_count_it_started_with(tiny_shards, monkeypatch):
    """The training order depends on the count: a run requeued onto a node with more cores keeps it."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
    state = ReadoutDataModule(tiny_shards).state_dict()
    assert state == {"num_workers": 2}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(9)))
    resumed = ReadoutDataModule(tiny_shards)
    resumed.load_state_dict(state)
    assert resumed.workers == 2 and ReadoutDataModule(tiny_shards).workers == 8
    explicit = ReadoutDataModule(tiny_shards, num_workers=4)
    with pytest.warns(UserWarning, match="data.num_workers is 4, the checkpoint's run used 2"):
        explicit.load_state_dict(state)
    assert explicit.workers == 4


# ------------------------------------------------------------------------------------------------------
# data.decode: device (needs the reader's decode/element hook)


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards of 8 synthetic samples at 64 px, stored as JPEG."""
    out = tmp_path_factory.mktemp("jpeg_shards")
    for i in range(2):
        write_tar(out / f"jpeg-{i:06d}.tar", jpeg_records(8, seed=10 + i))
    return out


def data_module(shards: Path, **overrides: Any) -> ReadoutDataModule:
    settings: dict[str, Any] = {
        "batch_size": 4, "num_workers": 2, "image_size": 48, "resize": 64, "min_scale": 0.2,
        "batches_per_epoch": 3, "shuffle_buffer": 8, "pin_memory": False,
    }  # fmt: skip
    return ReadoutDataModule(shards, shards, **{**settings, **overrides})


def transferred(data: ReadoutDataModule, batch: dict) -> dict:
    """``batch`` as Lightning hands it to the step: the data module's hooks around the copy."""
    batch = data.on_before_batch_transfer(batch, 0)
    return data.on_after_batch_transfer(move_data_to_device(batch, torch.device("cpu")), 0)


def test_device_decode_in_the_data_module_gives_the_batches_of_cpu_decode(jpeg_shards):
    """Two loader workers hand the raw JPEG batches over; after the transfer hooks, the batches are the
    CPU path's (same crops under the same seeds) in images, labels and keys. Validation is untouched."""
    cpu, device = data_module(jpeg_shards), data_module(jpeg_shards, decode="device")
    raw_batches = list(device.train_dataloader())
    assert all(isinstance(batch["jpeg"], list) and "image" not in batch for batch in raw_batches)
    for raw, expected in zip(raw_batches, cpu.train_dataloader(), strict=True):
        batch = transferred(device, raw)
        assert batch["image"].shape == (4, 3, 48, 48) and batch["image"].dtype == torch.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert torch.equal(batch["label"], expected["label"]) and batch["key"] == expected["key"]
        assert (batch["image"] - expected["image"]).abs().max() <= 2 / 255 + 1e-6
    for got, expected in zip(device.val_dataloader(), cpu.val_dataloader(), strict=True):
        assert_same_batches([transferred(device, got)], [expected])


def test_device_decode_of_png_shards_and_unknown_decoders_are_errors_that_name_the_field(tiny_shards):
    with pytest.raises(ValueError, match=r"data.decode='device' needs JPEG shards.*holds png"):
        ReadoutDataModule(tiny_shards, decode="device")
    with pytest.raises(ValueError, match=r"data.decode must be 'cpu' or 'device', got 'gpu'"):
        ReadoutDataModule(tiny_shards, decode="gpu")  # type: ignore[arg-type]


def test_readout_fit_trains_with_device_decode(jpeg_shards, tmp_path, monkeypatch):
    """Lightning calls the data module's transfer hooks: the steps get decoded images."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    config = tiny_config(jpeg_shards, max_steps=2)
    config["data"]["decode"] = "device"
    cli = fit(["--config", str(write_config(tmp_path / "tiny.yaml", config)), "--run_dir", "run"])
    assert cli.trainer.global_step == 2 and cli.datamodule.device_transform is not None
