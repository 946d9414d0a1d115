"""Checkpoints that are whole or absent, load without running code, and never hold a NaN.

- Saving (:class:`ReadoutCheckpointIO`, the CheckpointIO of ``readout.fit``): ``torch.save`` into memory,
  then :func:`readout.atomic.atomic_write`: a killed save leaves the previous checkpoint, never a
  half-written ``.ckpt``.
- Loading (:func:`read_checkpoint`): the whole file is read once, the CRC-32 of every record of its zip
  checked (torch's reader skips them, so a flipped bit would load silently), then ``torch.load`` with
  ``weights_only=True``: tensors and plain containers only. A pickle that would build any other object
  (and so could run code) is refused before anything in it runs.
- Resuming (:func:`first_usable`): candidates newest first; a truncated, corrupt, unsafe or non-finite
  one is named in the log and the next one is tried.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from readout.atomic import atomic_write

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from; the message names the file and why."""


class CheckpointSpaceError(OSError):
    """A checkpoint that could not be written for want of space (ENOSPC, EDQUOT); nothing of it is left."""


class CorruptCheckpointError(CheckpointError):
    """Truncated, not a torch zip archive, or a record whose CRC-32 does not match."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle holds objects other than tensors and plain containers: it is not unpickled."""


class NonFiniteCheckpointError(CheckpointError):
    """Weights, statistics or optimiser state hold NaN or Inf."""


# --------------------------------------------------------------------------------------------------------
# Non-finite values


def nonfinite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` and ``optimizer_states`` holding NaN or Inf."""
    found: list[str] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}")

    walk(checkpoint.get("state_dict", {}), "state_dict")
    walk(checkpoint.get("optimizer_states", []), "optimizer_states")
    return found


def check_finite(checkpoint: dict[str, Any], what: str = "the checkpoint") -> None:
    """Raises :class:`NonFiniteCheckpointError` naming the first tensors that hold NaN or Inf."""
    bad = nonfinite_entries(checkpoint)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteCheckpointError(f"{what} holds NaN or Inf in {shown}")


# --------------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint (local path or fsspec URL), checked whole and unpickled with ``weights_only=True``.

    Raises FileNotFoundError, or a :class:`CheckpointError` subclass whose message names the file.
    """
    url = os.fspath(path)
    with fsspec.open(url, "rb") as handle:
        payload = handle.read()
    verify_archive(payload, url)
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message opens with advice to load it unrestricted; the line that says what is wrong:
        found = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", str(error))
        raise UnsafeCheckpointError(
            f"{url} holds objects other than tensors and plain containers, so it is not unpickled "
            f"(readout loads checkpoints with weights_only=True and never runs code from one): "
            f"{found.group(1) if found else str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise CorruptCheckpointError(f"{url} is corrupt: {str(error).splitlines()[0]}") from error
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"{url} is not a checkpoint: it holds a {type(checkpoint).__name__}")
    check_finite(checkpoint, url)
    return checkpoint


def verify_archive(payload: bytes, url: str) -> None:
    """Raises :class:`CorruptCheckpointError` unless ``payload`` is a whole zip whose records match."""
    if not payload:
        raise CorruptCheckpointError(f"{url} is empty (0 bytes): truncated")
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CorruptCheckpointError(
            f"{url} is truncated or not a torch checkpoint ({len(payload)} bytes: {error})"
        ) from error
    if bad is not None:
        raise CorruptCheckpointError(f"{url} is corrupt: record {bad} does not match its CRC-32")


def first_usable(
    candidates: Sequence[str],
    report: Callable[[str], None] = log.warning,
    check: Callable[[dict[str, Any], str], Any] | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """The first candidate that reads as a whole, safe, finite checkpoint, with its content, or None.

    ``check(checkpoint, path)`` may raise :class:`CheckpointError` to pass over one more kind. Each
    candidate passed over is reported with why and what comes next, so a log says which checkpoint a
    resumed run fell back to.
    """
    for i, path in enumerate(candidates):
        try:
            checkpoint = read_checkpoint(path)
            if check is not None:
                check(checkpoint, path)
            return path, checkpoint
        except (CheckpointError, OSError) as error:
            following = candidates[i + 1] if i + 1 < len(candidates) else None
            then = f"falling back to {following}" if following else "no earlier checkpoint is left"
            report(f"cannot resume from {path}: {error}; {then}")
    return None


class ReadoutCheckpointIO(TorchCheckpointIO):
    """Lightning's CheckpointIO with atomic writes, whole-file checks and ``weights_only=True`` always.

    Lightning 2.6 passes ``weights_only=None`` on resume, which leaves the choice to torch's default;
    here it is True whatever is asked. A checkpoint holding NaN or Inf is neither written nor read.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        check_finite(checkpoint, f"the checkpoint for {os.fspath(path)} (not written)")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write(os.fspath(path), buffer.getvalue())
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # A full disk does not mend itself: stop (no requeue) and say what is still good.
            raise CheckpointSpaceError(
                f"no space left to write {os.fspath(path)} ({len(buffer.getvalue()) / 2**20:.1f} MiB, "
                f"{error.strerror}): nothing of it was kept and the checkpoints written before are whole; "
                "free space (or move --run_dir) and resume with --ckpt_path last"
            ) from error

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        fs, local = fsspec.core.url_to_fs(os.fspath(path))
        if not fs.exists(local):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return read_checkpoint(path, map_location=map_location)
