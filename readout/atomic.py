"""Files that are whole or absent: a write to a temporary name beside the target, then a rename.

On a local disk the payload is flushed and fsynced before ``os.replace`` and the directory after it; through
fsspec elsewhere the temporary is moved with ``fs.mv`` (an object store's single put is atomic by itself).
A process killed mid-write leaves the previous file and a stray ``.<name>.<id>.tmp``, never a half-written
file; the next write of that name removes the stray.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec


def atomic_write(url: str, payload: bytes) -> None:
    """Writes ``payload`` to ``url`` (a local path or fsspec URL) so that it is either whole or not there."""
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        with atomic_local_file(path) as temporary, open(temporary, "wb") as handle:
            handle.write(payload)
        return
    directory, name = posixpath.split(path)
    if directory:
        fs.makedirs(directory, exist_ok=True)
    for stray in _strays(fs, directory, name):
        fs.rm(stray)
    temporary = posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with fs.open(temporary, "wb") as handle:
            handle.write(payload)
        fs.mv(temporary, path)
    except BaseException:
        if fs.exists(temporary):
            fs.rm(temporary)
        raise


@contextmanager
def atomic_local_file(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary local path beside ``path`` to write a large file to by any means (a tar writer, say,
    where :func:`atomic_write` would need the whole payload in memory); on leaving the block without an
    error it is fsynced and renamed to ``path``, on an error removed."""
    directory, name = os.path.split(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    for stray in _strays(fsspec.filesystem("file"), directory, name):
        os.remove(stray)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
        _commit(temporary, os.fspath(path))
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _commit(temporary: str, path: str) -> None:
    """Flushes a written local temporary to disk, renames it to ``path`` and makes the rename durable."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(os.path.dirname(path))


def _strays(fs: fsspec.AbstractFileSystem, directory: str, name: str) -> Iterator[str]:
    """Temporary files of ``name`` left by a process killed while saving it."""
    try:
        listed = fs.ls(directory or ".", detail=False)
    except FileNotFoundError:
        return
    prefix = f".{name}."
    for entry in listed:
        base = posixpath.basename(entry.rstrip("/"))
        if base.startswith(prefix) and base.endswith(".tmp"):
            yield entry


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _fsync_directory(directory: str) -> None:
    """Makes the rename itself durable (POSIX); best effort where directories cannot be opened."""
    try:
        descriptor = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
