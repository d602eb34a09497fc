"""Atomic file writes: the one way jestclip replaces a file it may be interrupted writing (checkpoints,
reference-cache sidecars, keep lists, shard sidecars and manifests).

A write goes to ``PATH.tmp`` beside the target, is flushed and fsynced, renamed over ``PATH`` and the
directory fsynced, so a kill at any moment leaves either the old file or the new one, never a torn one; on
a failure the temporary file is removed and ``PATH`` is left as it was.

``check_writable`` is how a command finds out, before its work, that a place it will write cannot be
written (a read-only mount, no permission): one line naming the place and how to write elsewhere, rather
than a traceback after an hour of embedding or evaluating.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["NotWritableError", "atomic_bytes", "atomic_json", "atomic_write", "check_writable", "fsync_dir"]


class NotWritableError(PermissionError):
    """A place a command will write cannot be written (a read-only file system, no permission): a user's
    error, found before the work (a PermissionError, so commands end with one line and exit status 2)."""


def check_writable(directory: str | Path, what: str, hint: str) -> None:
    """A ``NotWritableError`` ``"{what} {directory} cannot be written (read-only file system); {hint}"``
    unless a file can be created in ``directory`` (or, when it does not exist yet, in its nearest existing
    ancestor, where it would be made). Tries for real (a temporary file, removed at once): ``os.access``
    does not see every read-only mount, ACL or quota. Creates no directory."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{what} {directory}: {probe} is a file, not a directory; {hint}")
    try:
        fd, name = tempfile.mkstemp(prefix=".jestclip-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exn:
        reason = (exn.strerror or type(exn).__name__).lower()
        raise NotWritableError(f"{what} {directory} cannot be written ({reason}); {hint}") from None


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the platform allows it."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> int:
    """``write(file)`` into ``path.tmp``, fsync it, rename it over ``path`` and fsync the directory; the bytes
    written. On any failure (an OSError such as a full disk, or ``write`` raising) the temporary file is
    removed, ``path`` is left as it was and the error is raised."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size


def atomic_bytes(path: str | Path, data: bytes | np.ndarray) -> int:
    """Write ``data`` (bytes, or an array as ``.npy`` without pickles) atomically; its size in bytes."""
    if isinstance(data, bytes):
        return atomic_write(path, lambda f: f.write(data))
    return atomic_write(path, lambda f: np.save(f, data, allow_pickle=False))


def atomic_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON with sorted keys, atomically."""
    text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
