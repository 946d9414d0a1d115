"""Checkpoints are whole or absent, a corrupt one is named, and ``--ckpt_path last`` falls back past it."""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import REPO, assert_same_readout_weights, fit_args

from readout import atomic
from readout.atomic import atomic_write
from readout.training.checkpointing import (
    CheckpointSpaceError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    ReadoutCheckpointIO,
    read_checkpoint,
)
from readout.training.fit import main as fit
from readout.training.fit import resume_candidates
from readout.training.module import ReadoutModule

pytestmark = pytest.mark.usefixtures("one_thread")


def small_checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def flip_a_byte_of_the_largest_record(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    start = record.header_offset
    name_length, extra_length = (
        int.from_bytes(raw[start + 26 : start + 28], "little"),
        int.from_bytes(raw[start + 28 : start + 30], "little"),
    )
    raw[start + 30 + name_length + extra_length + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------------------
# Atomic saves


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import builtins, os, sys, time
    import torch
    from readout import atomic
    from readout.training.checkpointing import ReadoutCheckpointIO

    class HalfWritten:
        '''Writes half of what it is given, says so, and waits to be killed.'''
        def __init__(self, path, mode):
            self.handle = builtins.open(path, mode)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.handle.close()
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            builtins.open(sys.argv[2], "w").write(str(os.getpid()))
            time.sleep(120)

    atomic.open = HalfWritten
    big = {"global_step": 2, "state_dict": {"w": torch.full((512, 512), 2.0)}}
    ReadoutCheckpointIO().save_checkpoint(big, sys.argv[1])
    """
)


@pytest.mark.fault(
    "SIGKILL during a checkpoint write",
    "checkpoint save",
    "the previous checkpoint stays whole; the half-written file is never resumed from",
)
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    ReadoutCheckpointIO().save_checkpoint(small_checkpoint(1), target)
    marker = tmp_path / "half-written"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(target), str(marker)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, "the saving process ended before it was killed"
        assert time.monotonic() < deadline, "the saving process never got half-way"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    assert read_checkpoint(target)["global_step"] == 1  # the previous checkpoint, whole
    (stray,) = target.parent.glob(".last.ckpt.*.tmp")  # the half-written bytes are under another name
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_checkpoint(stray)
    assert resume_candidates(str(tmp_path), fallbacks=True) == [str(target)]
    ReadoutCheckpointIO().save_checkpoint(small_checkpoint(3), target)
    assert read_checkpoint(target)["global_step"] == 3
    assert not stray.exists(), "the next save of that name removes the stray"


def test_atomic_write_goes_through_fsspec_urls():
    atomic_write("memory://reliability/run/last.ckpt", b"whole")
    import fsspec

    fs = fsspec.filesystem("memory")
    assert fs.cat("/reliability/run/last.ckpt") == b"whole"
    assert fs.ls("/reliability/run", detail=False) == ["/reliability/run/last.ckpt"]


# ------------------------------------------------------------------------------------------------------
# Corrupt checkpoints are named


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\): truncated"),
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            r"truncated or not a torch checkpoint",
        ),
        (lambda p: p.write_text("not a checkpoint"), r"truncated or not a torch checkpoint"),
        (flip_a_byte_of_the_largest_record, r"is corrupt: record .*data/0 does not match its CRC-32"),
    ],
    ids=["empty", "truncated", "text", "bit-flip"],
)
def test_a_damaged_checkpoint_is_detected_with_a_clear_error(damage, expected, tmp_path):
    path = tmp_path / "last.ckpt"
    ReadoutCheckpointIO().save_checkpoint(small_checkpoint(1), path)
    damage(path)
    with pytest.raises(CorruptCheckpointError, match=expected) as raised:
        read_checkpoint(path)
    assert str(raised.value).startswith(str(path))


@pytest.mark.fault(
    "corrupt checkpoints (truncated, bit-flipped)",
    "resume",
    "--ckpt_path last falls back to the newest good one and says so",
)
def test_resume_from_last_falls_back_past_corrupt_checkpoints_and_says_so(
    shards, tmp_path, no_slurm, fault_result
):
    """A run of 4 steps keeps checkpoints at steps 2 and 4 (and last.ckpt, step 4). With last.ckpt cut short
    and the step-4 one bit-flipped, ``--ckpt_path last`` resumes from step 2 and ends where a run that was
    never interrupted ends."""
    reference = fit(fit_args(shards, tmp_path / "reference"))
    run = tmp_path / "run"
    args = fit_args(shards, run, checkpoint={"save_top_k": -1})
    first = fit([*args, "--trainer.max_steps", "4"])
    assert isinstance(first.trainer.strategy.checkpoint_io, ReadoutCheckpointIO)
    last, step4, step2 = (
        run / "checkpoints" / "last.ckpt",
        *sorted((run / "checkpoints").glob("epoch=*"))[::-1],
    )
    assert "step=4" in step4.name and "step=2" in step2.name
    last.write_bytes(last.read_bytes()[:1000])
    flip_a_byte_of_the_largest_record(step4)

    with pytest.warns(UserWarning) as warned:
        resumed = fit([*args, "--ckpt_path", "last"])
    messages = [str(w.message) for w in warned]
    assert any(f"cannot resume from {last}" in m and f"falling back to {step4}" in m for m in messages), (
        messages
    )
    assert any(f"cannot resume from {step4}" in m and f"falling back to {step2}" in m for m in messages), (
        messages
    )
    assert resumed.trainer.global_step == 6
    assert_same_readout_weights(resumed, reference)
    fault_result.update(steps_lost=2, same_weights=True)


def test_an_explicit_checkpoint_that_is_corrupt_is_an_error_not_a_fallback(shards, tmp_path, no_slurm):
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 and then nothing")
    with pytest.raises(CorruptCheckpointError, match=r"cut\.ckpt is truncated"):
        fit([*fit_args(shards, tmp_path / "run"), "--ckpt_path", str(tmp_path / "cut.ckpt")])


# ------------------------------------------------------------------------------------------------------
# A NaN never reaches a checkpoint


def test_a_checkpoint_with_nan_is_neither_written_nor_read(tmp_path):
    path = tmp_path / "last.ckpt"
    io_ = ReadoutCheckpointIO()
    io_.save_checkpoint(small_checkpoint(1), path)
    poisoned = small_checkpoint(2)
    poisoned["optimizer_states"] = [{"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}]
    with pytest.raises(
        NonFiniteCheckpointError,
        match=r"\(not written\) holds NaN or Inf in optimizer_states\.0\.state\.0\.exp_avg",
    ):
        io_.save_checkpoint(poisoned, path)
    assert read_checkpoint(path)["global_step"] == 1
    torch.save(poisoned, tmp_path / "written-elsewhere.ckpt")
    with pytest.raises(NonFiniteCheckpointError, match="holds NaN or Inf"):
        read_checkpoint(tmp_path / "written-elsewhere.ckpt")


def test_the_module_refuses_to_checkpoint_nan_weights_on_every_rank():
    module = ReadoutModule(classifier="synthetic-cnn", weights=None, estimate_samples=1)
    with torch.no_grad():
        next(module.attributor.net.parameters())[0] = float("nan")
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": []}
    with pytest.raises(
        NonFiniteCheckpointError,
        match=r"not saved; the last one is kept\) holds NaN or Inf in state_dict\.attributor\.net\.",
    ):
        module.on_save_checkpoint(checkpoint)


# ------------------------------------------------------------------------------------------------------
# A full disk

#: Whether the disk of :class:`FillingFile` is full; set by :class:`DiskFillsAt`.
DISK = {"full": False}


class DiskFillsAt(pl.Callback):
    """The disk is full from step ``at`` on."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            DISK["full"] = True


class FillingFile:
    """``open`` of readout.atomic on a disk that may be full: then a write keeps half of its data and
    fails with ENOSPC, as a real full disk does part-way through a file."""

    def __init__(self, path: str, mode: str) -> None:
        self.handle = builtins.open(path, mode)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> int:
        if not DISK["full"]:
            return self.handle.write(data)
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


@pytest.mark.fault(
    "full disk (ENOSPC) during a save",
    "checkpoint save",
    "the run stops with an error naming the file; no partial file; the previous checkpoint resumes it",
)
def test_a_full_disk_at_a_save_stops_the_run_and_the_checkpoints_before_it_resume_it(
    uninterrupted,
    shards,
    tmp_path,
    monkeypatch,
    no_slurm,
    fault_result,
):
    """Checkpoints every 2 steps; the disk fills in step 4. The save at step 4 fails: the run stops with
    an error saying so (no requeue: a full disk does not mend itself), leaves no partial file, and
    the step-2 checkpoint resumes it, once there is space, to the uninterrupted run's weights."""
    monkeypatch.setitem(DISK, "full", False)
    monkeypatch.setattr(atomic, "open", FillingFile, raising=False)
    run = tmp_path / "run"
    fills = {"class_path": f"{__name__}.DiskFillsAt", "init_args": {"at": 3}}
    with pytest.raises(CheckpointSpaceError, match=r"no space left to write .*resume with --ckpt_path last"):
        fit(fit_args(shards, run, callbacks=[fills]))
    assert not list(run.rglob("*.tmp")), "a partial checkpoint was left behind"
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2

    DISK["full"] = False  # space was freed
    second = fit([*fit_args(shards, run), "--ckpt_path", "last"])
    assert second.trainer.global_step == 6
    assert_same_readout_weights(second, uninterrupted)
    fault_result.update(steps_lost=2, same_weights=True)
