"""Reading one shard: its tar members grouped by key into raw samples (``read_shard``), in member order.

Nothing here raises on bad data: a shard that cannot be opened, ends early or repeats a key is counted under
``READ_REASONS`` and reading goes on. Reads a shard's bytes and decodes none of them (``data.decode`` does).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

__all__ = ["READ_REASONS", "read_shard"]

READ_REASONS = ("bad_shard", "truncated_shard", "truncated_sample", "duplicate_key")
"""What ``read_shard`` counts; ``bad_shard`` and ``truncated_shard`` count a shard, the others a sample.

======================  ==========================================================================
reason                  what was skipped
======================  ==========================================================================
``bad_shard``           a shard that could not be opened or is not a tar archive (missing, unreadable, junk)
``truncated_shard``     a shard that ends early (cut mid-member, no end-of-archive marker, a corrupt
                        header); its members after the cut are lost, uncounted
``truncated_sample``    the sample being read when its shard ended early
``duplicate_key``       a sample whose key already appeared earlier in the same shard (the first one is kept)
======================  ==========================================================================
"""

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples


class _TarInfo(tarfile.TarInfo):
    """Records on the TarFile whether the archive ended with its end-of-archive marker (a zero block).

    Python's tarfile ends iteration silently on a missing or cut header after the first member; this is how
    a truncated shard is told from a complete one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar._jestclip_end_marker = True  # type: ignore[attr-defined]
            raise


class _Grouper:
    """Groups consecutive tar members by key into raw samples; a key seen before in the shard is a duplicate.

    A member whose extension the current sample already has starts a new sample (a duplicate of the key).
    """

    def __init__(self, url: str, count: Callable[[str], None]) -> None:
        self.url, self.count = url, count
        self.current: dict[str, Any] | None = None
        self.duplicate = False
        self.seen: set[str] = set()

    def add(self, key: str, ext: str, data: bytes) -> dict[str, Any] | None:
        """Add a member; return the sample it completed, if any (duplicates are counted, not returned)."""
        done = None
        if self.current is None or key != self.current["__key__"] or ext in self.current:
            done = self.finish()
            self.duplicate = key in self.seen
            self.seen.add(key)
            self.current = {"__key__": key, "__url__": self.url}
        self.current[ext] = data
        return done

    def finish(self) -> dict[str, Any] | None:
        """The sample being assembled (None if none, or if it duplicates an earlier key)."""
        done, self.current = self.current, None
        if done is not None and self.duplicate:
            self.count("duplicate_key")
            return None
        return done

    def abandon(self) -> None:
        """The shard ended early: the sample being assembled is lost."""
        if self.current is not None:
            self.count("truncated_sample")
        self.current = None


def read_shard(url: str, count: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, one bytes entry per extension) of one shard, in member order.

    Never raises on bad data: problems are passed to ``count`` as skip reasons (``READ_REASONS``).
    """
    try:
        stream = gopen(url, "rb")
    except Exception:
        count("bad_shard")
        return
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
        except Exception:
            count("bad_shard")
            return
        yield from _tar_samples(tar, url, count)
    finally:
        with suppress(Exception):
            stream.close()


def _tar_samples(tar: tarfile.TarFile, url: str, count: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    group = _Grouper(url, count)
    try:
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            member = tar.extractfile(info)
            done = group.add(key, ext.lower(), member.read() if member is not None else b"")
            if done is not None:
                yield done
        complete = getattr(tar, "_jestclip_end_marker", False)
    except Exception:  # cut data, a corrupt header or compressed stream: the rest of the shard is lost
        complete = False
    if not complete:
        count("truncated_shard")
        group.abandon()
    done = group.finish()
    if done is not None:
        yield done
