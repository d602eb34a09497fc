"""The reference-embedding cache: a frozen reference model's embeddings stored next to each shard, by key.

Format (``jestclip-refcache/2``), for shard ``dir/00000.tar`` and cache name ``reference``, three files:

- ``dir/00000.reference.keys.npy``: the sample keys with a row, UTF-8 as fixed-width bytes (``S<w>``),
  sorted, so a key's row is ``np.searchsorted(keys, key)``;
- ``dir/00000.reference.emb.npy``: float16 ``[n, 2, D]``, L2-normalised, row i the image (``[:, 0]``) and
  text (``[:, 1]``) embedding of ``keys[i]``: one contiguous 4·D-byte read per sample, one memory map
  for both;
- ``dir/00000.reference.json``: the header, written last (it marks the sidecar complete): model
  fingerprint, name, logit scale and bias, dim, the shard's byte size when cached, rows, key width, that
  every embedding was checked finite when written, the keys of samples the loader skipped as undecodable
  (they have no row), and the byte size of both arrays (a truncated array shows in its size).

Files are written to ``*.tmp``, fsynced and renamed, the header removed first and written last, so a
killed writer leaves no header and the shard is cached again. ``ReferenceCache`` reads headers only and
``stat``s the arrays (cheap for 10^5 shards); a shard's arrays are memory-mapped the first time a sample of
it is looked up (at most ``max_open`` shards at once). ``lookup(keys, urls)`` groups the keys by shard (the
loader's ``SuperBatch.urls``) and locates them with ``np.searchsorted`` in that shard's sorted keys: no
per-key Python dict, and no memory beyond the pages read. Embedding maps are advised ``MADV_RANDOM`` (a page
fault reads one page, not the device's read-ahead window) and a dense run of rows ``MADV_WILLNEED`` (read
ahead in bulk); see docs/benchmarks.md, "Reference cache at scale". Old ``SHARD.NAME.npz`` sidecars are
refused with a message to re-run ``jestclip cache-reference``.

Keys: ``cache_reference`` lists each shard's sample keys from its tar headers and records those the loader
skipped, and compares them again with the sidecar when it resumes (rewriting a mis-keyed one);
``ReferenceCache`` checks them only when asked (``check_keys=True``: it reads every shard's tar headers and
key list, too much for 10^9 pairs at every start) and otherwise relies on the shard's byte size.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import resource
import sys
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from jestclip.data.loader import SuperBatchStream, expand_urls
from jestclip.data.progress import progress
from jestclip.selection import Embeddings

__all__ = [
    "FORMAT",
    "CacheMeta",
    "Embedder",
    "ReferenceCache",
    "SidecarError",
    "cache_reference",
    "shard_keys",
    "sidecar_path",
    "write_sidecar",
]

FORMAT = "jestclip-refcache/2"

# images [n, 3, H, W], n captions -> L2-normalised (image [n, D], text [n, D]), any device and float dtype
Embedder = Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]

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


def sidecar_path(shard: str | Path, name: str) -> Path:
    """The header of cache ``name`` of ``shard``: ``dir/00000.tar`` -> ``dir/00000.NAME.json``."""
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.{name}.json")


def _array_path(shard: str | Path, name: str, kind: str) -> Path:
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.{name}.{kind}.npy")


def _old_path(shard: str | Path, name: str) -> Path:
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.{name}.npz")


@dataclass(frozen=True)
class CacheMeta:
    """What a sidecar records about the reference model and the shard it was cached from."""

    fingerprint: str
    model: str
    scale: float
    bias: float
    dim: int
    shard_bytes: int


@dataclass(frozen=True)
class _Header:
    """A sidecar's header: the meta, the rows it holds, and what was checked when it was written."""

    meta: CacheMeta
    rows: int
    key_width: int
    finite: bool
    skipped_keys: tuple[str, ...]
    file_bytes: dict[str, int]  # "keys", "emb" -> byte size of the .npy file

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self.meta), **_fields_of(self)})


def _fields_of(header: _Header) -> dict[str, Any]:
    return {
        "rows": header.rows,
        "key_width": header.key_width,
        "finite": header.finite,
        "skipped_keys": list(header.skipped_keys),
        "file_bytes": header.file_bytes,
    }


def _read_header(shard: str, name: str) -> _Header:
    """The header of ``shard``'s sidecar; SidecarError (one line) if missing, old-format or unreadable."""
    path = sidecar_path(shard, name)
    if not path.exists():
        if _old_path(shard, name).exists():
            raise SidecarError(
                f"{_old_path(shard, name)} is an old-format {name!r} cache (.npz)",
                "re-run `jestclip cache-reference` to rewrite it as memory-mappable files",
            )
        raise SidecarError(
            f"no cached {name!r} embeddings for shard {shard} (expected {path})", "run cache-reference"
        )
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        meta = CacheMeta(**{k: raw[k] for k in CacheMeta.__dataclass_fields__})
        files = {k: int(raw["file_bytes"][k]) for k in ("keys", "emb")}
        skipped = tuple(str(k) for k in raw["skipped_keys"])
        header = _Header(meta, int(raw["rows"]), int(raw["key_width"]), raw["finite"] is True, skipped, files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
        raise SidecarError(f"{path} is corrupt ({_one_line(exn)})") from None
    return header


def _check_header(shard: str, name: str, header: _Header) -> None:
    """SidecarError unless the shard is unchanged, every row was finite and both arrays have their size."""
    path = sidecar_path(shard, name)
    if header.meta.shard_bytes != os.path.getsize(shard):
        raise SidecarError(
            f"shard {shard} changed since its {name!r} embeddings were cached ({path})", "run cache-reference"
        )
    if not header.finite:
        raise SidecarError(f"{path} does not record its embeddings as checked finite")
    data = {"keys": header.rows * header.key_width, "emb": header.rows * 2 * header.meta.dim * 2}
    for kind, expected in header.file_bytes.items():
        array = _array_path(shard, name, kind)
        if not 0 < expected - data[kind] <= 65536:  # the .npy header: 64 bytes to 64 KiB
            raise SidecarError(
                f"{path} is corrupt: a {kind} file of {expected} bytes cannot hold {header.rows} rows of "
                f"dim {header.meta.dim}"
            )
        size = array.stat().st_size if array.exists() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise SidecarError(f"{array} is truncated ({found})")


def shard_keys(url: str | Path) -> set[str]:
    """The sample keys of a tar shard from its member names (headers only, as webdataset groups them);
    members after a corrupt header are unreadable to the loader too and are left out."""
    keys: set[str] = set()
    try:
        with tarfile.open(url, "r:*") as tar:
            while (member := tar.next()) is not None:
                name = member.name
                if not member.isreg() or re.match(r"__[^/]*__($|/)", name):
                    continue
                match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
                if match:
                    keys.add(match.group(1))
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


def write_sidecar(
    shard: str | Path,
    name: str,
    keys: Sequence[str],
    image: np.ndarray,
    text: np.ndarray,
    meta: CacheMeta,
    skipped_keys: Iterable[str] = (),
) -> None:
    """Write ``shard``'s sidecar: rows sorted by key, float16, finite (ValueError naming the key if not).

    keys: n distinct sample keys; image, text: ``[n, D]``; meta.dim must be D (0 when n = 0).
    skipped_keys: keys of the shard's samples that have no row (undecodable), recorded in the header.
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
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"non-finite embedding for sample key {encoded[bad[0]].decode()!r} of shard {shard}")
    header_path = sidecar_path(shard, name)
    header_path.unlink(missing_ok=True)  # the header marks a complete sidecar: gone until all is written
    files = {
        kind: _write_atomic(_array_path(shard, name, kind), a)
        for kind, a in (("keys", encoded), ("emb", emb))
    }
    header = _Header(meta, len(encoded), encoded.dtype.itemsize, True, tuple(sorted(skipped_keys)), files)
    _write_atomic(header_path, header.to_json().encode())
    dir_fd = os.open(header_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomic(path: Path, data: np.ndarray | bytes) -> int:
    """Write ``data`` (an array as .npy, or bytes) to ``path`` via a fsynced temporary; its byte size."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            np.save(f, data, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return size


def _open_arrays(shard: str, name: str, header: _Header) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map ``shard``'s sorted keys ``[n]`` and embeddings ``[n, 2, D]``; SidecarError if unreadable."""
    arrays = []
    want = (("keys", np.dtype(f"S{header.key_width}"), (header.rows,)),)
    want += (("emb", np.dtype(np.float16), (header.rows, 2, header.meta.dim)),)
    for kind, dtype, shape in want:
        path = _array_path(shard, name, kind)
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
    return arrays[0], arrays[1]


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


def _compare_keys(shard: str, name: str, header: _Header, keys: np.ndarray) -> None:
    """SidecarError unless the sidecar's rows and skipped keys are exactly the shard's sample keys."""
    cached = {k.decode("utf-8") for k in keys.tolist()}
    in_shard = shard_keys(shard)
    missing = sorted(in_shard - cached - set(header.skipped_keys))
    if missing:
        raise SidecarError(
            f"shard {shard} holds sample key {missing[0]!r} ({len(missing)} such) that its {name!r} sidecar "
            f"{sidecar_path(shard, name)} has no row for and does not record as skipped"
        )
    extra = sorted(cached - in_shard)
    if extra:
        raise SidecarError(
            f"{name!r} sidecar {sidecar_path(shard, name)} has a row for sample key {extra[0]!r} "
            f"({len(extra)} such) that shard {shard} does not hold"
        )


def _existing(url: str, name: str, fingerprint: str, model: str) -> tuple[str, str]:
    """The state of ``url``'s sidecar for ``cache_reference``: ("ok" | "missing" | "old" | "stale" | "broken",
    what is wrong); "ok" means complete, up to date, readable and keyed like the shard (tar headers read)."""
    try:
        header = _read_header(url, name)
    except SidecarError as exn:
        if sidecar_path(url, name).exists():
            return "broken", exn.problem
        return ("old" if _old_path(url, name).exists() else "missing"), exn.problem
    same_model = (header.meta.fingerprint, header.meta.model) == (fingerprint, model)  # model: NAME@TAG
    if not same_model or header.meta.shard_bytes != os.path.getsize(url):  # (the tag sets the preprocessing)
        return "stale", ""
    try:
        _check_header(url, name, header)
        keys, _ = _open_arrays(url, name, header)
        _compare_keys(url, name, header, keys)
    except SidecarError as exn:
        return "broken", exn.problem
    return "ok", ""


def cache_reference(
    embed: Embedder,
    shards: str | Path | Sequence[str | Path],
    *,
    model_name: str,
    fingerprint: str,
    scale: float,
    bias: float,
    transform: Callable,
    name: str = "reference",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Embed every decodable sample of every shard with ``embed``; write one sidecar per shard.

    embed: ``embed(images [n, 3, H, W], n captions) -> (image [n, D], text [n, D])``, L2-normalised, on any
    device and in any float dtype (``jestclip.models.reference_embedder`` makes one from an open_clip model).
    model_name, fingerprint, scale, bias: what the sidecars record about the reference model (``scale`` is
    the logit multiplier ``exp(logit_scale)``). transform: image preprocessing of the model.
    Resumable and repairing: a shard whose sidecar is complete, holds this ``fingerprint``, matches the
    shard's size and keys (tar headers) is kept; a corrupt, truncated or mis-keyed one is rewritten and
    counted as repaired; an old ``.npz`` sidecar is replaced. Returns counts: sidecars written (repaired
    among them) and kept, samples embedded, decode skips by reason.
    """
    urls = expand_urls(shards)
    summary: dict[str, Any] = {"written": 0, "repaired": 0, "kept": 0, "samples": 0, "skipped": Counter()}
    template = CacheMeta(fingerprint, model_name, float(scale), float(bias), 0, 0)
    for url in progress(urls, desc=f"cache {name}", unit="shard"):
        state, problem = _existing(url, name, fingerprint, model_name)
        if state == "ok":
            summary["kept"] += 1
            continue
        if state == "broken":
            tqdm.write(f"cache-reference: repairing {problem}", file=sys.stderr)
        summary["samples"] += _cache_shard(
            embed, url, name, template, transform, batch_size, summary["skipped"]
        )
        summary["written"] += 1
        summary["repaired"] += state == "broken"
        if state == "old":
            _old_path(url, name).unlink()
    summary["skipped"] = dict(summary["skipped"])
    return summary


def _cache_shard(
    embed: Embedder,
    url: str,
    name: str,
    template: CacheMeta,
    transform: Callable,
    batch_size: int,
    skipped: Counter[str],
) -> int:
    """Embed the decodable samples of shard ``url`` and write its sidecar; the number embedded."""
    size = os.path.getsize(url)
    keys: list[str] = []
    images: list[np.ndarray] = []
    texts: list[np.ndarray] = []
    stream = SuperBatchStream([url], batch_size=batch_size, shuffle_shards=False, transform=transform)
    for batch in stream:
        with torch.no_grad():
            image, text = embed(batch.images, batch.texts)
        _check_embeddings(image, text, batch.keys, url)
        keys += batch.keys
        images.append(image.to("cpu", torch.float16).numpy())
        texts.append(text.to("cpu", torch.float16).numpy())
        skipped.update(batch.skipped)
    dim = int(images[0].shape[1]) if images else 0
    image_rows = np.concatenate(images) if images else np.zeros((0, 0), np.float16)
    text_rows = np.concatenate(texts) if texts else np.zeros((0, 0), np.float16)
    meta = CacheMeta(template.fingerprint, template.model, template.scale, template.bias, dim, size)
    write_sidecar(url, name, keys, image_rows, text_rows, meta, shard_keys(url) - set(keys))
    return len(keys)


def _check_embeddings(image: Tensor, text: Tensor, keys: Sequence[str], url: str) -> None:
    """ValueError unless ``image`` and ``text`` are ``[n, D]``, finite and L2-normalised row by row."""
    n = len(keys)
    if image.ndim != 2 or image.shape[0] != n or text.shape != image.shape:
        raise ValueError(
            f"embed returned image {tuple(image.shape)} and text {tuple(text.shape)} for {n} samples; "
            "expected two [n, D] tensors"
        )
    for kind, emb in (("image", image), ("text", text)):
        bad = torch.nonzero(~torch.isfinite(emb.float()).all(dim=-1)).flatten()
        if bad.numel():
            key = keys[int(bad[0])]
            raise ValueError(
                f"embed returned a non-finite {kind} embedding for sample key {key!r} of shard {url}"
            )
        norms = emb.float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            raise ValueError(f"embed returned {kind} embeddings that are not L2-normalised")


def _default_max_open() -> int:
    """How many shards' arrays stay memory-mapped at once: 2 file descriptors each, an eighth of the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 8))


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
    ) -> None:
        """Read every shard's sidecar header; ValueError (one line, naming the file) if one is missing,
        old-format, corrupt, truncated, stale, or disagrees with the others. Arrays are not read.

        fingerprint, dim: what the caller expects (e.g. the reference model it was told to use).
        check_keys: also compare each shard's sample keys (tar headers) with its sidecar's rows and
        skipped keys (reads every shard's key list: ``cache-reference`` does this when it resumes).
        max_open: shards kept memory-mapped at once (default: an eighth of the open-file limit).
        """
        self.name = name
        self.urls = expand_urls(shards)
        self._headers = [self._header(url) for url in self.urls]
        self.meta = self._common_meta(fingerprint, dim)
        self._shard_of = {url: i for i, url in enumerate(self.urls)}
        self._shard_of.update((os.path.abspath(url), i) for i, url in enumerate(self.urls))
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.max_open = max_open or _default_max_open()
        self._everywhere: tuple[np.ndarray, np.ndarray] | None = None  # all keys sorted, their shards
        if check_keys:
            for i, url in enumerate(self.urls):
                _compare_keys(url, name, self._headers[i], self._arrays(i)[0])

    def _header(self, url: str) -> _Header:
        header = _read_header(url, self.name)
        _check_header(url, self.name, header)
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

    def _arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``shard``'s memory-mapped (sorted keys, embeddings), the least recently used unmapped."""
        arrays = self._open.get(shard)
        if arrays is not None:
            self._open.move_to_end(shard)
            return arrays
        arrays = _open_arrays(self.urls[shard], self.name, self._headers[shard])
        self._open[shard] = arrays
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrays

    def lookup(
        self, keys: Sequence[str], urls: Sequence[str] | None = None, *, device: str | torch.device = "cpu"
    ) -> Embeddings:
        """Cached embeddings of the samples ``keys`` of shards ``urls`` (a ``SuperBatch``'s ``keys`` and
        ``urls``), in order, float32 on ``device``; a ValueError names a missing key and its shard.

        Without ``urls`` each key is searched in every shard (an index of all keys, built once: for small
        caches; pass ``urls`` at scale).
        """
        encoded = _encode(keys)
        shards = self._find(keys, encoded) if urls is None else self._shard_ids(keys, urls)
        rows = self._gather(keys, encoded, shards)  # [2, n, D] float16
        if torch.device(device).type == "cpu":  # numpy converts float16 several times faster than torch
            both = torch.from_numpy(rows.astype(np.float32))
        else:
            both = torch.from_numpy(rows).to(device).float()  # float16 across the bus
        return Embeddings(both[0], both[1], self.meta.scale, self.meta.bias)

    def _shard_ids(self, keys: Sequence[str], urls: Sequence[str]) -> np.ndarray:
        """The index of each key's shard, from its URL; ValueError for a shard the cache was not opened on."""
        if len(urls) != len(keys):
            raise ValueError(f"lookup got {len(keys)} keys but {len(urls)} shard urls")
        known = {}
        for url in dict.fromkeys(urls):
            shard = self._shard_of.get(url, self._shard_of.get(os.path.abspath(url)))
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

    def _gather(self, keys: Sequence[str], encoded: np.ndarray, shards: np.ndarray) -> np.ndarray:
        """Rows ``[2, n, D]`` float16 (image, text) of the keys: per shard a searchsorted, a fancy index."""
        out = np.empty((2, len(keys), self.meta.dim), np.float16)
        order = np.argsort(shards, kind="stable")
        starts = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, starts) if len(order) else []:
            shard = int(shards[group[0]])
            shard_keys_, emb = self._arrays(shard)
            wanted = encoded[group]
            at = np.minimum(np.searchsorted(shard_keys_, wanted), max(len(shard_keys_) - 1, 0))
            found = shard_keys_[at] == wanted if len(shard_keys_) else np.zeros(len(group), bool)
            if not found.all():
                raise self._missing(keys[int(group[np.flatnonzero(~found)[0]])], shard)
            by_row = np.argsort(at)  # read the file front to back
            first, last = int(at[by_row[0]]), int(at[by_row[-1]]) + 1
            if len(group) >= 64 and last - first <= 4 * len(group):  # dense: read the span ahead, in bulk
                _advise(emb, getattr(mmap, "MADV_WILLNEED", None), (first, last))
            out[:, group[by_row]] = emb[at[by_row]].swapaxes(0, 1)
        return out

    def _missing(self, key: str, shard: int) -> ValueError:
        url = self.urls[shard]
        why = (
            "; it was skipped as undecodable when cached" if key in self._headers[shard].skipped_keys else ""
        )
        return ValueError(
            f"sample key {key!r} of shard {url} has no cached {self.name!r} embedding "
            f"({sidecar_path(url, self.name)}){why}"
        )


def _encode(keys: Sequence[str]) -> np.ndarray:
    """Keys as the sidecars store them: UTF-8, fixed-width bytes."""
    return np.char.encode(np.asarray(list(keys), dtype=str), "utf-8") if len(keys) else np.zeros(0, "S1")
