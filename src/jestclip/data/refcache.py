"""The reference-embedding cache: a frozen reference model's embeddings of each shard's samples, by key.

Format (``jestclip-refcache/3``), for shard ``dir/00000.tar`` and cache name ``reference``, four files:

- ``dir/00000.reference.keys.npy``: the sample keys with a row, UTF-8 as fixed-width bytes (``S<w>``),
  sorted, so a key's row is ``np.searchsorted(keys, key)``;
- ``dir/00000.reference.emb.npy``: float16 ``[n, 2, D]``, L2-normalised, row i the image (``[:, 0]``) and
  text (``[:, 1]``) embedding of ``keys[i]``: one contiguous 4·D-byte read per sample, one memory map
  for both;
- ``dir/00000.reference.digest.npy``: uint64 ``[n]``, row i the ``content_digest`` of ``keys[i]``'s image
  and caption bytes when it was embedded;
- ``dir/00000.reference.json``: the header, written last (it marks the sidecar complete): the shard's
  identity, model fingerprint, name, logit scale and bias, dim, the shard's byte size when cached (None for a
  shard behind a URL), rows, key width, that every embedding was checked finite when written, the keys and
  content digests of samples the loader skipped as undecodable (they have no row), and the byte size of the
  three arrays (a truncated array shows in its size).

Where: beside each local shard by default; with ``cache_dir`` every sidecar lives in that directory as
``STEM-ID.NAME.*`` (``STEM`` the shard's file name without ``.tar``, ``ID`` 16 hex digits of the SHA-256 of
its identity: the absolute path of a local shard, else the URL exactly as given, e.g.
``pipe:curl -s https://host/pool/00000.tar``). That is how shards behind a URL (``pipe:``, ``http(s)://``,
``s3://`` through ``pipe:``) get a cache: every rank reads the same directory (a shared filesystem); cache
and train must name the shards by the same URL.

Staleness: a changed shard is detected before anyone uses its embeddings. Opening checks the headers (and
a local shard's byte size); ``lookup(keys, urls, digests=...)`` compares each sample's content digest, which
the loader computes from the bytes it read (``SuperBatch.digests``), with the digest cached for its row, and
a mismatch is a ``SidecarError`` naming the shard and key: a re-rendered or re-captioned sample never gets
the old sample's embedding, at the cost of one 64-bit compare per sample. A ``lookup`` without digests
checks by default too: the first time it serves a shard's rows it reads that shard (no decoding) and
compares every sample with the sidecar; only ``check_content=False`` skips that, said by the caller.
``caching.cache_reference`` re-reads each shard it would keep (no decoding) and rewrites the sidecar when any
sample's key, image or caption differs.

Damage: every row a ``lookup`` serves is checked finite (``B x 2 x D`` values per call, on the device the
rows go to): a sidecar damaged after it was written (rows edited in place at the same size, a bad sector)
is a ``SidecarError`` naming the shard, the key and the repair, not NaN scores or a diverged run three
steps later. ``cache_reference`` checks every row of a sidecar it would keep and rewrites a damaged one.

Files are written to ``*.tmp``, fsynced and renamed, the header removed first and written last, so a
killed writer leaves no header and the shard is cached again. ``ReferenceCache`` reads headers only and
``stat``s the arrays (cheap for 10^5 shards); a shard's arrays are memory-mapped the first time a sample of
it is looked up (at most ``max_open`` shards at once). ``lookup(keys, urls)`` groups the keys by shard (the
loader's ``SuperBatch.urls``) and locates them with ``np.searchsorted`` in that shard's sorted keys: no
per-key Python dict, and no memory beyond the pages read. Embedding maps are advised ``MADV_RANDOM`` (a page
fault reads one page, not the device's read-ahead window) and a dense run of rows ``MADV_WILLNEED`` (read
ahead in bulk); see docs/benchmarks.md, "Reference cache at scale". Sidecars of earlier formats (``.npz``,
``jestclip-refcache/2`` without digests) are refused with a message to re-run ``jestclip cache-reference``,
which rewrites them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import mmap
import os
import re
import resource
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from jestclip.data.decode import content_digest
from jestclip.data.files import atomic_bytes
from jestclip.data.shardlist import distinct_shards, expand_urls, file_identity
from jestclip.data.tarread import read_shard
from jestclip.selection import Embeddings

__all__ = [
    "FORMAT",
    "CacheMeta",
    "ReferenceCache",
    "SidecarError",
    "shard_content",
    "shard_identity",
    "shard_keys",
    "sidecar_path",
    "write_sidecar",
]

FORMAT = "jestclip-refcache/3"
_OLD_FORMATS = ("jestclip-refcache/2",)  # without content digests: refused, rewritten by cache-reference
_KINDS = ("keys", "emb", "digest")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http://, s3://, file: (not a plain local path)

_REPAIR = "run `jestclip cache-reference` on its shard to rewrite it"


class SidecarError(ValueError):
    """A sidecar that is missing, corrupt, truncated or out of date: ``cache-reference`` rewrites it.

    ``problem`` is what is wrong (naming the file); the message adds what to do about it.
    """

    def __init__(self, problem: str, hint: str = _REPAIR) -> None:
        super().__init__(f"{problem}; {hint}")
        self.problem = problem


def _one_line(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {' '.join(str(exn).split())}"


def _is_local(shard: str | Path) -> bool:
    return not _URL.match(str(shard))


def shard_identity(shard: str | Path) -> str:
    """What names a shard in a cache directory: a local shard's absolute path, else the URL as given."""
    return os.path.abspath(shard) if _is_local(shard) else str(shard)


def _base(shard: str | Path, name: str, cache_dir: str | Path | None) -> Path:
    """Every sidecar file of ``shard`` is this path plus a suffix (``.json``, ``.keys.npy``, ...)."""
    if cache_dir is None:
        if not _is_local(shard):
            raise ValueError(
                f"shard {shard} is not a local file, so its {name!r} sidecars cannot sit beside it; name a "
                "cache directory that every rank can read (cache-reference --cache-dir DIR; in training "
                "reference_cache_dir=DIR)"
            )
        shard = Path(shard)
        return shard.with_name(f"{shard.stem}.{name}")
    identity = shard_identity(shard)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", re.split(r"[/\\\s]", identity.rstrip("/ '\""))[-1])
    stem = stem.removesuffix(".tar")[:64] or "shard"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{stem}-{digest}.{name}"


def sidecar_path(shard: str | Path, name: str, cache_dir: str | Path | None = None) -> Path:
    """The header of cache ``name`` of ``shard``: ``dir/00000.tar`` -> ``dir/00000.NAME.json``, or in
    ``cache_dir``: ``cache_dir/00000-ID.NAME.json`` (see the module docstring). A shard behind a URL needs a
    ``cache_dir`` (ValueError otherwise)."""
    return Path(f"{_base(shard, name, cache_dir)}.json")


def cached_names(shard: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """The names of the reference caches that have a header for ``shard`` (beside it, or in ``cache_dir``),
    sorted; [] when none (or the shard is not local and no ``cache_dir`` is given)."""
    try:
        base = _base(shard, "NAME", cache_dir)
    except ValueError:
        return []
    prefix = base.name.removesuffix(".NAME") + "."
    if not base.parent.is_dir():
        return []
    names = {
        p.name[len(prefix) : -len(".json")]
        for p in base.parent.glob(f"{glob.escape(prefix)}*.json")
        if "." not in p.name[len(prefix) : -len(".json")]
    }
    return sorted(n for n in names if n)


def _array_path(shard: str | Path, name: str, kind: str, cache_dir: str | Path | None = None) -> Path:
    return Path(f"{_base(shard, name, cache_dir)}.{kind}.npy")


def _old_path(shard: str | Path, name: str, cache_dir: str | Path | None = None) -> Path:
    return Path(f"{_base(shard, name, cache_dir)}.npz")


@dataclass(frozen=True)
class CacheMeta:
    """What a sidecar records about the reference model and the shard it was cached from."""

    fingerprint: str
    model: str
    scale: float
    bias: float
    dim: int
    shard_bytes: int | None  # None: a shard behind a URL (no size to compare)


@dataclass(frozen=True)
class _Header:
    """A sidecar's header: the meta, the rows it holds, and what was checked when it was written."""

    shard: str  # shard_identity of the shard it was cached from
    meta: CacheMeta
    rows: int
    key_width: int
    finite: bool
    skipped: dict[str, int]  # keys of samples without a row -> their content digests
    file_bytes: dict[str, int]  # "keys", "emb", "digest" -> byte size of the .npy file

    @property
    def skipped_keys(self) -> tuple[str, ...]:
        return tuple(self.skipped)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "shard": self.shard,
                **asdict(self.meta),
                "rows": self.rows,
                "key_width": self.key_width,
                "finite": self.finite,
                "skipped_keys": list(self.skipped),
                "skipped_digests": [f"{d:016x}" for d in self.skipped.values()],
                "file_bytes": self.file_bytes,
            }
        )


def _read_header(shard: str, name: str, cache_dir: str | Path | None = None) -> _Header:
    """The header of ``shard``'s sidecar; SidecarError (one line) if missing, old-format or unreadable."""
    path = sidecar_path(shard, name, cache_dir)
    rerun = "re-run `jestclip cache-reference` to rewrite it"
    if not path.exists():
        if _old_path(shard, name, cache_dir).exists():
            raise SidecarError(
                f"{_old_path(shard, name, cache_dir)} is an old-format {name!r} cache (.npz)",
                f"{rerun} as memory-mappable files",
            )
        others = cached_names(shard, cache_dir)
        there = f"; caches found for it: {', '.join(repr(n) for n in others)}" if others else ""
        raise SidecarError(
            f"no cached {name!r} embeddings for shard {shard} (expected {path}{there})",
            "name one of those (reference_cache=NAME in training, --reference-cache NAME elsewhere) or run "
            "cache-reference"
            if others
            else "run cache-reference",
        )
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("format") in _OLD_FORMATS:
            raise SidecarError(
                f"{path} is a {name!r} cache of format {raw['format']}, without the content digests that "
                "show a changed shard",
                f"{rerun} (format {FORMAT})",
            )
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        meta = CacheMeta(**{k: raw[k] for k in CacheMeta.__dataclass_fields__})
        files = {k: int(raw["file_bytes"][k]) for k in _KINDS}
        digests = [int(d, 16) for d in raw["skipped_digests"]]
        skipped = dict(zip((str(k) for k in raw["skipped_keys"]), digests, strict=True))
        rows, width = int(raw["rows"]), int(raw["key_width"])
        header = _Header(str(raw["shard"]), meta, rows, width, raw["finite"] is True, skipped, files)
    except SidecarError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
        raise SidecarError(f"{path} is corrupt ({_one_line(exn)})") from None
    return header


def _check_header(shard: str, name: str, header: _Header, cache_dir: str | Path | None = None) -> None:
    """SidecarError unless the header is this shard's, the (local) shard kept its size, every row was finite
    and the arrays have their size."""
    path = sidecar_path(shard, name, cache_dir)
    if header.shard != shard_identity(shard) and cache_dir is not None:
        raise SidecarError(f"{path} holds the {name!r} embeddings of shard {header.shard}, not of {shard}")
    if header.meta.shard_bytes is not None and _is_local(shard):
        if header.meta.shard_bytes != os.path.getsize(shard):
            raise SidecarError(
                f"shard {shard} changed since its {name!r} embeddings were cached ({path})",
                "run cache-reference",
            )
    if not header.finite:
        raise SidecarError(f"{path} does not record its embeddings as checked finite")
    data = {
        "keys": header.rows * header.key_width,
        "emb": header.rows * 2 * header.meta.dim * 2,
        "digest": header.rows * 8,
    }
    base = str(_base(shard, name, cache_dir))
    for kind, expected in header.file_bytes.items():
        array = f"{base}.{kind}.npy"
        if not 0 < expected - data[kind] <= 65536:  # the .npy header: 64 bytes to 64 KiB
            raise SidecarError(
                f"{path} is corrupt: a {kind} file of {expected} bytes cannot hold {header.rows} rows of "
                f"dim {header.meta.dim}"
            )
        size = os.stat(array).st_size if os.path.exists(array) else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise SidecarError(f"{array} is truncated ({found})")


def shard_keys(url: str | Path) -> set[str]:
    """The sample keys of a local tar shard from its member names (headers only, as webdataset groups them);
    members after a corrupt header are unreadable to the loader too and are left out."""
    keys: set[str] = set()
    try:
        with tarfile.open(url, "r:*") as tar:
            while (member := tar.next()) is not None:
                name = member.name
                if not member.isreg() or re.match(r"__[^/]*__($|/)", name):
                    continue
                key, _ = base_plus_ext(name)
                if key is not None:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


def shard_content(url: str | Path) -> dict[str, int]:
    """Every sample of a shard, as the loader groups it: key -> ``content_digest`` (image and caption bytes).

    Reads the whole shard (local path or any URL the loader reads), decodes nothing; duplicate keys keep
    their first sample, as the loader does; a truncated shard gives the samples before the cut.
    """
    return {raw["__key__"]: content_digest(raw) for raw in read_shard(str(url), lambda _: None)}


def write_sidecar(
    shard: str | Path,
    name: str,
    keys: Sequence[str],
    image: np.ndarray,
    text: np.ndarray,
    meta: CacheMeta,
    *,
    digests: Sequence[int] | None = None,
    skipped: dict[str, int] | None = None,
    cache_dir: str | Path | None = None,
) -> None:
    """Write ``shard``'s sidecar: rows sorted by key, float16, finite (ValueError naming the key if not).

    keys: n distinct sample keys; image, text: ``[n, D]``; meta.dim must be D (0 when n = 0).
    digests: the n samples' ``content_digest``s (None: read from the shard, which must hold every key; a
    ValueError names one it lacks). skipped: key -> content digest of the shard's samples that
    have no row (undecodable), recorded in the header. cache_dir: see ``sidecar_path``.
    """
    encoded = _encode(keys)
    order = np.argsort(encoded, kind="stable")
    encoded = encoded[order]
    duplicate = np.flatnonzero(encoded[1:] == encoded[:-1])
    if duplicate.size:
        raise ValueError(f"shard {shard} holds sample key {encoded[duplicate[0]].decode()!r} more than once")
    image, text = np.asarray(image, np.float16), np.asarray(text, np.float16)
    if image.shape != (len(encoded), meta.dim) or text.shape != image.shape:
        raise ValueError(
            f"sidecar of shard {shard}: image {image.shape} and text {text.shape} for {len(encoded)} keys; "
            f"expected [{len(encoded)}, {meta.dim}] each"
        )
    emb = np.stack([image, text], axis=1)[order]
    if digests is None:
        content = shard_content(shard)
        lacking = [k for k in keys if k not in content]
        if lacking:
            raise ValueError(f"shard {shard} lacks sample key {lacking[0]!r}: pass the content digests")
        digests = [content[k] for k in keys]
    digest = np.asarray(list(digests), np.uint64)
    if digest.shape != (len(encoded),):
        raise ValueError(
            f"sidecar of shard {shard}: {digest.shape[0]} content digests for {len(encoded)} keys"
        )
    digest = digest[order]
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"non-finite embedding for sample key {encoded[bad[0]].decode()!r} of shard {shard}")
    header_path = sidecar_path(shard, name, cache_dir)
    header_path.parent.mkdir(parents=True, exist_ok=True)
    header_path.unlink(missing_ok=True)  # the header marks a complete sidecar: gone until all is written
    files = {
        kind: atomic_bytes(_array_path(shard, name, kind, cache_dir), a)
        for kind, a in (("keys", encoded), ("emb", emb), ("digest", digest))
    }
    skipped = dict(sorted((skipped or {}).items()))
    header = _Header(shard_identity(shard), meta, len(encoded), encoded.dtype.itemsize, True, skipped, files)
    atomic_bytes(header_path, header.to_json().encode())
    dir_fd = os.open(header_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _open_arrays(
    shard: str, name: str, header: _Header, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-map ``shard``'s sorted keys ``[n]``, embeddings ``[n, 2, D]`` and content digests ``[n]``;
    SidecarError if unreadable."""
    arrays = []
    want = (("keys", np.dtype(f"S{header.key_width}"), (header.rows,)),)
    want += (("emb", np.dtype(np.float16), (header.rows, 2, header.meta.dim)),)
    want += (("digest", np.dtype(np.uint64), (header.rows,)),)
    for kind, dtype, shape in want:
        path = _array_path(shard, name, kind, cache_dir)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exn:
            raise SidecarError(f"{path} is corrupt ({_one_line(exn)})") from None
        if array.dtype != dtype or array.shape != shape:
            raise SidecarError(
                f"{path} is corrupt: {array.dtype} {array.shape}, its header says {dtype} {shape}"
            )
        arrays.append(array)
    _advise(arrays[1], getattr(mmap, "MADV_RANDOM", None))  # no read-around: a fault reads one page
    return arrays[0], arrays[1], arrays[2]


def _advise(emb: np.ndarray, advice: int | None, rows: tuple[int, int] | None = None) -> None:
    """``madvise`` the pages of ``emb``'s rows ``[first, last)`` (all by default), where supported.

    Without MADV_RANDOM every page fault reads the device's whole read-ahead window around it (8 MiB here):
    a lookup of 16,384 random rows of a cache larger than RAM read 27 GB and took 23 s instead of 1.5 s.
    """
    mm = getattr(emb, "_mmap", None)
    if mm is None or advice is None or not hasattr(mm, "madvise") or emb.size == 0:
        return
    base = emb.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 starts in the mapping
    first, last = rows if rows is not None else (0, len(emb))
    start = base + first * emb.strides[0]
    aligned = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(advice, aligned, base + last * emb.strides[0] - aligned)


def _compare_content(
    shard: str,
    name: str,
    header: _Header,
    keys: np.ndarray,
    digests: np.ndarray,
    where: Path,
    *,
    read: str | None = None,
) -> None:
    """SidecarError unless the sidecar's rows and skipped samples are exactly the shard's samples, with the
    same image and caption bytes (reads the whole shard, from ``read`` when given: a local copy of it;
    decodes nothing)."""
    cached = dict(zip((k.decode("utf-8") for k in keys.tolist()), digests.tolist(), strict=True))
    cached.update(header.skipped)
    in_shard = shard_content(read or shard)
    missing = sorted(in_shard.keys() - cached.keys())
    if missing:
        raise SidecarError(
            f"shard {shard} holds sample key {missing[0]!r} ({len(missing)} such) that its {name!r} sidecar "
            f"{where} has no row for and does not record as skipped"
        )
    extra = sorted(cached.keys() - in_shard.keys())
    if extra:
        raise SidecarError(
            f"{name!r} sidecar {where} has a row for sample key {extra[0]!r} ({len(extra)} such) that shard "
            f"{shard} does not hold"
        )
    changed = sorted(k for k, d in in_shard.items() if cached[k] != d)
    if changed:
        raise SidecarError(
            f"shard {shard} changed since its {name!r} embeddings were cached: sample key {changed[0]!r} "
            f"({len(changed)} of {len(in_shard)}) has other image or caption bytes ({where})"
        )


def _default_max_open() -> int:
    """How many shards' arrays stay memory-mapped at once: 3 file descriptors each, an eighth of the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 24))


class ReferenceCache:
    """Cached reference embeddings of a set of shards: headers checked up front, arrays memory-mapped per
    shard on first use, samples joined by (shard, key)."""

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        name: str = "reference",
        fingerprint: str | None = None,
        dim: int | None = None,
        check_keys: bool = False,
        max_open: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        """Read every shard's sidecar header; ValueError (one line, naming the file) if one is missing,
        old-format, corrupt, truncated, stale, or disagrees with the others. Arrays are not read.

        fingerprint, dim: what the caller expects (e.g. the reference model it was told to use).
        check_keys: also compare each shard's samples (keys, image and caption bytes) with its sidecar's
        rows and skipped keys (reads every shard: ``cache-reference`` does this when it resumes; training
        relies on ``lookup``'s per-sample digests instead).
        max_open: shards kept memory-mapped at once (default: an eighth of the open-file limit).
        cache_dir: the directory the sidecars are in (None: beside each local shard); see ``sidecar_path``.
        """
        self.name = name
        self.cache_dir = cache_dir
        self.urls = distinct_shards(expand_urls(shards))[0]  # a shard under two names is one shard
        self._headers = [self._header(url) for url in self.urls]
        self.meta = self._common_meta(fingerprint, dim)
        self._shard_of = {url: i for i, url in enumerate(self.urls)}
        self._shard_of.update((os.path.abspath(url), i) for i, url in enumerate(self.urls))
        self._by_file = {file_identity(url): i for i, url in enumerate(self.urls)}  # any other name of it
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.max_open = max_open or _default_max_open()
        self._everywhere: tuple[np.ndarray, np.ndarray] | None = None  # all keys sorted, their shards
        self._verified: set[int] = set()  # shards whose samples were compared with their sidecar
        if check_keys:
            for i in range(len(self.urls)):
                self._verify(i)

    def _verify(self, shard: int) -> None:
        """Read shard ``shard`` (no decoding) and compare its samples with its sidecar's rows: keys, image and
        caption bytes (a SidecarError names the first difference); once per shard."""
        if shard in self._verified:
            return
        url = self.urls[shard]
        keys, _, digests = self._arrays(shard)
        where = sidecar_path(url, self.name, self.cache_dir)
        _compare_content(url, self.name, self._headers[shard], keys, digests, where)
        self._verified.add(shard)

    def _header(self, url: str) -> _Header:
        header = _read_header(url, self.name, self.cache_dir)
        _check_header(url, self.name, header, self.cache_dir)
        return header

    def _common_meta(self, fingerprint: str | None, dim: int | None) -> CacheMeta:
        """The meta all sidecars share (shards with no rows have no dim); ValueError if they differ."""
        first_i = next((i for i, h in enumerate(self._headers) if h.rows), 0)
        first = self._headers[first_i].meta

        def facts(meta: CacheMeta, rows: int) -> tuple:
            return meta.fingerprint, meta.dim if rows else first.dim, meta.scale, meta.bias

        def said(meta: CacheMeta) -> str:
            return f"model {meta.fingerprint}, dim {meta.dim}, scale {meta.scale:g}, bias {meta.bias:g}"

        for url, header in zip(self.urls, self._headers, strict=True):
            if facts(header.meta, header.rows) != facts(first, 1):
                raise ValueError(
                    f"{self.name!r} embeddings of {url} ({said(header.meta)}) differ from those of "
                    f"{self.urls[first_i]} ({said(first)}); run cache-reference again"
                )
        if fingerprint is not None and first.fingerprint != fingerprint:
            raise ValueError(
                f"cached {self.name!r} embeddings come from model {first.fingerprint} ({first.model}), "
                f"not the expected {fingerprint}"
            )
        if dim is not None and first.dim != dim:
            raise ValueError(f"cached {self.name!r} embeddings have dim {first.dim}, expected {dim}")
        return first

    def __len__(self) -> int:
        """Rows cached over all shards."""
        return sum(h.rows for h in self._headers)

    def keys(self, shard: int) -> list[str]:
        """The sample keys with a row in shard ``shard`` (an index into ``urls``), sorted as stored."""
        return [key.decode("utf-8") for key in self._arrays(shard)[0].tolist()]

    def digests(self, shard: int) -> np.ndarray:
        """The content digests of shard ``shard``'s rows as cached (uint64, in ``keys`` order)."""
        return np.asarray(self._arrays(shard)[2], dtype=np.uint64)

    def _arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard ``shard``'s memory-mapped (sorted keys, embeddings, content digests), the least recently used
        unmapped."""
        arrays = self._open.get(shard)
        if arrays is not None:
            self._open.move_to_end(shard)
            return arrays
        arrays = _open_arrays(self.urls[shard], self.name, self._headers[shard], self.cache_dir)
        self._open[shard] = arrays
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrays

    def lookup(
        self,
        keys: Sequence[str],
        urls: Sequence[str] | None = None,
        *,
        digests: Sequence[int] | None = None,
        check_content: bool = True,
        device: str | torch.device = "cpu",
    ) -> Embeddings:
        """Cached embeddings of the samples ``keys`` of shards ``urls`` (a ``SuperBatch``'s ``keys`` and
        ``urls``), in order, float32 on ``device``; a ValueError names a missing key and its shard, a
        ``SidecarError`` a non-finite row (a sidecar damaged since it was written) with its shard and key.

        digests: the samples' ``content_digest``s as read now (``SuperBatch.digests``); a sample whose image
        or caption bytes differ from those embedded is a ``SidecarError`` naming its shard and key. None:
        each shard is read once (no decoding), the first time its rows are served, and all its samples
        compared with the sidecar instead. check_content=False: neither; the rows are served as cached,
        whatever the shards hold now (say so only where that is what you want: statistics of a cache).
        Without ``urls`` each key is searched in every shard (an index of all keys, built once: for small
        caches; pass ``urls`` at scale).
        """
        encoded = _encode(keys)
        if digests is not None and len(digests) != len(keys):
            raise ValueError(f"lookup got {len(keys)} keys but {len(digests)} content digests")
        shards = self._find(keys, encoded) if urls is None else self._shard_ids(keys, urls)
        if digests is None and check_content:
            for shard in np.unique(shards).tolist():
                self._verify(shard)
        rows = self._gather(keys, encoded, shards, digests)  # [2, n, D] float16
        if torch.device(device).type == "cpu":  # numpy converts float16 several times faster than torch
            both = torch.from_numpy(rows.astype(np.float32))
        else:
            both = torch.from_numpy(rows).to(device).float()  # float16 across the bus
        finite = torch.isfinite(both).all(dim=-1).all(dim=0)  # [n]: B x 2 x D values, one sync
        if not bool(finite.all()):
            raise self._damaged(keys, shards, (~finite).nonzero().flatten().tolist())
        return Embeddings(both[0], both[1], self.meta.scale, self.meta.bias)

    def _damaged(self, keys: Sequence[str], shards: np.ndarray, bad: list[int]) -> SidecarError:
        first = bad[0]
        url = self.urls[int(shards[first])]
        where = _array_path(url, self.name, "emb", self.cache_dir)
        return SidecarError(
            f"the cached {self.name!r} embedding of sample key {keys[first]!r} of shard {url} is not finite "
            f"({len(bad)} of {len(keys)} in this lookup): {where} was damaged after it was written",
            "run `jestclip cache-reference` on the shard to rewrite it (it repairs damaged sidecars)",
        )

    def _shard_ids(self, keys: Sequence[str], urls: Sequence[str]) -> np.ndarray:
        """The index of each key's shard, from its URL; ValueError for a shard the cache was not opened on."""
        if len(urls) != len(keys):
            raise ValueError(f"lookup got {len(keys)} keys but {len(urls)} shard urls")
        known = {}
        for url in dict.fromkeys(urls):
            shard = self._shard_of.get(url, self._shard_of.get(os.path.abspath(url)))
            if shard is None:
                shard = self._by_file.get(file_identity(url))
                if shard is not None:
                    self._shard_of[url] = shard
            if shard is None:
                key = keys[list(urls).index(url)]
                raise ValueError(
                    f"sample key {key!r} comes from shard {url}, which this {self.name!r} cache was not "
                    "opened with"
                )
            known[url] = shard
        return np.fromiter(map(known.__getitem__, urls), dtype=np.int64, count=len(urls))

    def _find(self, keys: Sequence[str], encoded: np.ndarray) -> np.ndarray:
        """The index of the shard holding each key, by searching all keys (indexed on first use)."""
        if self._everywhere is None:
            every = [np.asarray(self._arrays(i)[0]) for i in range(len(self.urls))]
            shards = np.repeat(np.arange(len(every)), [len(k) for k in every])
            all_keys = np.concatenate(every)
            order = np.argsort(all_keys, kind="stable")
            self._everywhere = all_keys[order], shards[order]
        all_keys, shards = self._everywhere
        at = np.minimum(np.searchsorted(all_keys, encoded), max(len(all_keys) - 1, 0))
        found = all_keys[at] == encoded if len(all_keys) else np.zeros(len(keys), bool)
        if not found.all():
            missing = keys[int(np.flatnonzero(~found)[0])]
            raise ValueError(
                f"sample key {missing!r} has no cached {self.name!r} embedding in any of "
                f"{len(self.urls)} shards"
            )
        return shards[at]

    def _gather(
        self, keys: Sequence[str], encoded: np.ndarray, shards: np.ndarray, digests: Sequence[int] | None
    ) -> np.ndarray:
        """Rows ``[2, n, D]`` float16 (image, text) of the keys: per shard a searchsorted, a fancy index;
        with ``digests``, each row's cached content digest must equal the sample's."""
        out = np.empty((2, len(keys), self.meta.dim), np.float16)
        want = None if digests is None else np.fromiter(digests, np.uint64, count=len(keys))
        order = np.argsort(shards, kind="stable")
        starts = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, starts) if len(order) else []:
            shard = int(shards[group[0]])
            shard_keys_, emb, cached = self._arrays(shard)
            wanted = encoded[group]
            at = np.minimum(np.searchsorted(shard_keys_, wanted), max(len(shard_keys_) - 1, 0))
            found = shard_keys_[at] == wanted if len(shard_keys_) else np.zeros(len(group), bool)
            if not found.all():
                raise self._missing(keys[int(group[np.flatnonzero(~found)[0]])], shard)
            if want is not None:
                changed = np.flatnonzero(cached[at] != want[group])
                if changed.size:
                    raise self._changed(keys[int(group[changed[0]])], shard, changed.size, len(group))
            by_row = np.argsort(at)  # read the file front to back
            first, last = int(at[by_row[0]]), int(at[by_row[-1]]) + 1
            if len(group) >= 64 and last - first <= 4 * len(group):  # dense: read the span ahead, in bulk
                _advise(emb, getattr(mmap, "MADV_WILLNEED", None), (first, last))
            out[:, group[by_row]] = emb[at[by_row]].swapaxes(0, 1)
        return out

    def _changed(self, key: str, shard: int, count: int, of: int) -> SidecarError:
        url = self.urls[shard]
        where = sidecar_path(url, self.name, self.cache_dir)
        return SidecarError(
            f"shard {url} changed since its {self.name!r} embeddings were cached: sample key {key!r} "
            f"({count} of {of} in this batch) has other image or caption bytes ({where})",
            "run cache-reference",
        )

    def _missing(self, key: str, shard: int) -> ValueError:
        url = self.urls[shard]
        why = (
            "; it was skipped as undecodable when cached" if key in self._headers[shard].skipped_keys else ""
        )
        return ValueError(
            f"sample key {key!r} of shard {url} has no cached {self.name!r} embedding "
            f"({sidecar_path(url, self.name, self.cache_dir)}){why}"
        )


def _encode(keys: Sequence[str]) -> np.ndarray:
    """Keys as the sidecars store them: UTF-8, fixed-width bytes."""
    return np.char.encode(np.asarray(list(keys), dtype=str), "utf-8") if len(keys) else np.zeros(0, "S1")
