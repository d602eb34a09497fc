"""Which shards to read: shard URLs from brace patterns, directories and lists (``expand_urls``), each shard
once under any of its names (``distinct_shards``).

Looks at file names and metadata only (``stat``, directory listings), never at a shard's contents
(``data.tarread`` reads them). Local paths are checked before any stream starts: a missing file, a pattern
naming missing files, or a directory holding tars in a form the loader cannot read is a ValueError naming
them.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls as expand_pattern

__all__ = ["SHARD_SUFFIXES", "distinct_shards", "expand_urls", "file_identity", "shard_files"]

# The shard forms the loader reads (tarfile's "r|*": plain, gzip, bzip2, xz; zstd where Python has it), by
# file name: what a directory of shards yields.
_COMPRESSED = {
    "gz": (".tar.gz", ".tgz"),
    "bz2": (".tar.bz2", ".tbz2", ".tbz"),
    "xz": (".tar.xz", ".txz"),
    "zst": (".tar.zst", ".tzst"),
}
_READABLE = [
    suffix for method, forms in _COMPRESSED.items() if method in tarfile.TarFile.OPEN_METH for suffix in forms
]
SHARD_SUFFIXES = (".tar", *_READABLE)
# tar forms it cannot read: a directory holding one is refused by name rather than read in part
_UNREADABLE_SUFFIXES = (
    ".tar.zst",
    ".tzst",
    ".tar.lz4",
    ".tar.lz",
    ".tar.lzo",
    ".tar.br",
    ".tar.z",
    ".tar.7z",
)

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http://, s3://, file:: not checked up front


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from brace patterns (``::``-separated), directories of shards (``shard_files``), or a list.

    Local paths must exist: a missing file, or a pattern naming missing files, is a ValueError naming it.
    """
    if isinstance(urls, str | Path):
        urls = [urls]
    out: list[str] = []
    for item in urls:
        out.extend(_expand_one(str(item)))
    if not out:
        raise ValueError("no shard URLs given")
    return out


def distinct_shards(urls: Sequence[str]) -> tuple[list[str], int]:
    """``urls`` with every shard once, by the first name it is listed under, and how many other names were
    dropped. A local shard is its file (device and inode): a symlink in the pool directory, a hard link,
    ``dir/./00000.tar`` beside ``dir/00000.tar`` all name one shard, which would otherwise be read twice an
    epoch, put the same pairs on two ranks in one step and twice in a super-batch, and be cached twice. A
    URL (``pipe:``, ``http://``) is its text."""
    seen: set[Any] = set()
    distinct = []
    for url in urls:
        identity = file_identity(url)
        if identity not in seen:
            seen.add(identity)
            distinct.append(url)
    return distinct, len(urls) - len(distinct)


def file_identity(url: str | Path) -> Any:
    """What tells shards apart: ``(device, inode)`` of a local file, else the URL (or a path that does not
    exist) as text."""
    url = str(url)
    if not _URL_SCHEME.match(url):
        with suppress(OSError):
            info = os.stat(url)
            return (info.st_dev, info.st_ino)
    return url


def shard_files(directory: str | Path) -> list[str]:
    """Every shard in ``directory``, in name order: each file named ``*.tar`` or a compressed tar the loader
    reads (``SHARD_SUFFIXES``). A directory that also holds tars in a form it cannot read (``.tar.zst``
    before Python 3.14, ``.tar.lz4``, ...) is a ValueError naming them: reading only the others would leave
    part of the pool out without a word. Other files (sidecars, manifests) are not shards."""
    # names first (string tests), then the type of the few that look like tars: a pool directory holds each
    # shard's sidecars and manifests too (10^5 shards: 5 x 10^5 entries, a stat each cost seconds)
    with os.scandir(directory) as entries:
        tars = [e for e in entries if e.name.lower().endswith(_UNREADABLE_SUFFIXES + SHARD_SUFFIXES)]
    files = sorted(e.name for e in tars if e.is_file())  # DirEntry.is_file: no stat on most filesystems
    unreadable = [name for name in files if name.lower().endswith(_UNREADABLE_SUFFIXES)]
    unreadable = [name for name in unreadable if not name.lower().endswith(SHARD_SUFFIXES)]
    if unreadable:
        first = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        raise ValueError(
            f"directory {directory} holds {len(unreadable)} shard(s) in a form the loader cannot read "
            f"({first}); it reads {', '.join(SHARD_SUFFIXES)}: convert them, or name the shards to read"
        )
    root = Path(directory)  # names as Path joins them (``./dir`` -> ``dir/...``), as before
    return [str(root / name) for name in files if name.lower().endswith(SHARD_SUFFIXES)]


def _expand_one(item: str) -> list[str]:
    if not _URL_SCHEME.match(item) and not any(mark in item for mark in "{}*?["):
        try:  # a plain local path, the common case at scale: one stat, not a pattern expansion and two
            mode = os.stat(item).st_mode
        except OSError:
            raise ValueError(f"shard {item!r} does not exist") from None
        if stat.S_ISREG(mode):
            return [item]
    if Path(item).is_dir():
        found = shard_files(item)
        if not found:
            raise ValueError(f"no shards ({', '.join(SHARD_SUFFIXES)}) in directory {item}")
        return found
    found = list(expand_pattern(item))
    missing = [u for u in found if not _URL_SCHEME.match(u) and not Path(u).is_file()]
    if missing and found == [item]:
        raise ValueError(f"shard {item!r} does not exist")
    if missing:
        first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"shard pattern {item!r}: {len(missing)} of {len(found)} files missing ({first})")
    return found
