"""The keep list of a static reference-score filter: which samples of which shards training reads.

``filter_shards`` scores every pair of a pool once from its cached reference embeddings
(``selection.filter.reference_scores``), keeps a fraction Q of the whole pool (``keep_mask``) and writes the
keep list; ``KeepList`` reads it back and, passed to ``SuperBatchStream(keep=...)``, makes the stream skip
every other sample (as ``not_kept``) before decoding it. What is kept and why: ``jestclip.selection.filter``
and docs/selection.md, "Static reference-score filter".

Format (``jestclip-keeplist/2``), a directory holding:

- ``keep.keys.npy``: the kept sample keys, UTF-8 as fixed-width bytes (``S<w>``), shard after shard in the
  header's shard order, sorted within each shard;
- ``keep.digests.npy``: uint64, row i the ``content_digest`` (image and caption bytes) of key i as scored:
  the reference cache's digests, checked against the shards when the keep list is written;
- ``keep.json``: the header, written last (it marks the keep list complete): the reference cache (name,
  model, fingerprint, logit scale and bias), the score (``similarity`` or ``loss``, its units, and for
  ``loss`` the loss, batch size and seed), the keep fraction Q of the whole pool, the threshold (the lowest
  kept score), pairs kept and scored, the byte size of the keys and digests files, and per shard its
  identity (``refcache.shard_identity``: a local shard's absolute path, else its URL as given), byte size
  (None for a shard behind a URL), pairs scored (the shard's cached rows) and kept;
- ``filter.json``: the resolved settings of the command that wrote it, with its counts (a record; never
  read back).

Files are written to ``*.tmp``, fsynced and renamed; an existing keep list is never overwritten.
Samples of a shard without a cached reference row (undecodable when cached) are not scored and so not kept.

Staleness: a keep list is only as good as the embeddings it was scored from. ``filter_shards`` reads every
shard once (not decoded) and refuses a cache row whose sample's image or caption bytes differ from those it
was embedded from (the reference cache's content digests), so the digests it records are the shards'.
Training checks at startup that the keep list is for its shards and each local shard's size (a stat, no
shard read: ``check``), then where each shard is read each kept sample's content digest, computed by the
loader before decoding, against the recorded one (``__call__``), and, once a shard has been read whole, that
it still holds every key kept of it (``shard_read``): a shard re-rendered or re-captioned since, even at the
same size or behind a URL, is a ``KeptSampleChangedError`` naming the shard and key. Keep lists
of format ``jestclip-keeplist/1`` (without digests) are refused with a message to run ``jestclip filter``
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jestclip.data.files import atomic_bytes, check_writable
from jestclip.data.progress import progress as progress_bar
from jestclip.data.ranks import Ranks
from jestclip.data.refcache import ReferenceCache, shard_content, shard_identity
from jestclip.data.shardlist import distinct_shards, expand_urls
from jestclip.data.topcut import order_keys, tie_quotas, top_cut
from jestclip.selection import Embeddings
from jestclip.selection.filter import keep_count, keep_mask, reference_scores, score_threshold

__all__ = ["DIGESTS", "FORMAT", "HEADER", "KEYS", "KeepList", "KeptSampleChangedError", "filter_shards"]

FORMAT = "jestclip-keeplist/2"
_OLD_FORMATS = ("jestclip-keeplist/1",)  # without content digests: refused, `jestclip filter` writes anew
HEADER, KEYS, DIGESTS, RECORD = "keep.json", "keep.keys.npy", "keep.digests.npy", "filter.json"
SCORE_UNITS = {"similarity": "cosine similarity", "loss": "minus the pair's loss, nats"}


class KeptSampleChangedError(ValueError):
    """A kept sample whose image or caption bytes are not those its score was computed from.

    Raised in a DataLoader worker, torch re-raises it in the main process with "Caught ... in DataLoader
    worker process N. Original Traceback ..." as its message; only the original message is kept (as
    ``stream.NoReadableSampleError`` does), so the error stays one line naming the shard and key.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def filter_shards(
    shards: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    keep: float,
    score: str = "similarity",
    loss: str = "sigmoid",
    batch_size: int = 1024,
    seed: int = 0,
    name: str = "reference",
    fingerprint: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    check_content: bool = True,
) -> dict[str, Any]:
    """Score every cached pair of ``shards`` with the reference cache ``name``, keep fraction ``keep`` of the
    whole pool, write the keep list into directory ``out``; return the header (without its shard list).

    score, loss, batch_size, seed: as ``reference_scores`` (batch_size and seed matter for "loss" only).
    fingerprint: the reference model the cache must hold (None: any). cache_dir: the directory of the
    reference cache's sidecars (None: beside each local shard; a shard behind a URL needs one), as
    ``refcache.sidecar_path``. Every shard is read once (not decoded): each cached row's content digest must
    be its sample's as the shard holds it now, and is recorded for the samples kept (``check_content=False``
    opts out and records the cache's digests as they are: for simulated caches without shards).

    ``similarity`` scores stream: under torchrun every rank scores its shards (``Ranks.part``), no process
    holds more than one shard's rows, and the exact global cut is found by histogram passes (``topcut``); the
    keep list is the one a single process writes, byte for byte. ``loss`` scores hold the pool in one
    process (its batches mix the whole pool) and refuse more than one rank.

    A ValueError (one line) for a missing, stale or foreign cache (``ReferenceCache``) or a changed shard, a
    keep fraction that keeps nothing, or an ``out`` that is a file or already holds a keep list.
    """
    out = Path(out)
    ranks = Ranks.current()

    def check_out() -> None:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file, not a directory")
        if (out / HEADER).exists():
            raise FileExistsError(
                f"{out / HEADER} already holds a keep list; choose another --out or remove it"
            )
        check_writable(out, "keep list directory", "choose another --out")  # before the pool is read

    ranks.run(check_out)
    settings = {"shards": [str(s) for s in ([shards] if isinstance(shards, str | Path) else shards)]}
    settings |= {"out": str(out), "keep": keep, "score": score, "loss": loss, "batch_size": batch_size}
    settings |= {"seed": seed, "reference_cache": name, "fingerprint": fingerprint}
    settings |= {"cache_dir": None if cache_dir is None else str(cache_dir)}
    if score == "similarity":
        stream = _Streamed(out, ranks, name=name, fingerprint=fingerprint, cache_dir=cache_dir)
        return stream.filter(shards, keep, settings, progress=progress, check_content=check_content)
    if ranks.world > 1:
        raise ValueError(
            f"--score {score} draws its batches from the whole pool: run it as one process (not torchrun), "
            "or use --score similarity, which scores each rank's shards"
        )
    return _in_memory(
        shards,
        out,
        keep,
        score,
        settings,
        name=name,
        fingerprint=fingerprint,
        cache_dir=cache_dir,
        progress=progress,
        check_content=check_content,
        loss=loss,
        batch_size=batch_size,
        seed=seed,
    )


def _in_memory(
    shards: Any,
    out: Path,
    keep: float,
    score: str,
    settings: dict[str, Any],
    *,
    name: str,
    fingerprint: str | None,
    cache_dir: str | Path | None,
    progress: bool,
    check_content: bool,
    loss: str,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """``filter_shards`` with every score of the pool in this process (the ``loss`` score's way)."""
    cache = ReferenceCache(shards, name=name, fingerprint=fingerprint, cache_dir=cache_dir)
    keys = [cache.keys(i) for i in range(len(cache.urls))]
    digests = [_digests(cache, i, shard_keys_, check_content) for i, shard_keys_ in enumerate(keys)]
    kw = {"loss": loss, "batch_size": batch_size, "seed": seed} if score == "loss" else {}
    scores = _score_pool(cache, keys, digests, score, progress, loss=loss, batch_size=batch_size, seed=seed)
    mask = keep_mask(scores, keep).numpy()
    header = {
        **_header_head(name, cache.meta, score),
        **kw,
        "keep": keep,
        "threshold": score_threshold(scores, keep),
        "kept": int(mask.sum()),
        "total": len(mask),
    }
    _write_keep_list(out, header, settings, cache.urls, keys, digests, mask)
    return header


def _header_head(name: str, meta: Any, score: str) -> dict[str, Any]:
    """The keep list header's first fields: the format, the reference cache and the score."""
    return {
        "format": FORMAT,
        "reference": {
            "name": name,
            "model": meta.model,
            "fingerprint": meta.fingerprint,
            "scale": meta.scale,
            "bias": meta.bias,
        },
        "score": score,
        "score_units": SCORE_UNITS[score],
    }


def _digests(cache: ReferenceCache, shard: int, keys: list[str], check_content: bool) -> np.ndarray:
    """The content digests a keep list records for ``keys`` of shard ``shard``: the shard's as read now
    (``_scored_digests``), or with ``check_content=False`` the cache's own."""
    if check_content:
        return _scored_digests(cache, shard, keys)
    return np.asarray(cache.digests(shard), np.uint64)


class _Streamed:
    """The similarity filter, a shard at a time on each rank (``filter_shards``): score and set aside each
    shard's scores (``OUT/.scores/``), find the global cut (``topcut``), hand out ties in pool order, then
    write every rank's kept rows into the one keep list at the offsets the per-shard counts give."""

    def __init__(
        self,
        out: Path,
        ranks: Ranks,
        *,
        name: str,
        fingerprint: str | None,
        cache_dir: str | Path | None,
    ) -> None:
        self.out, self.ranks, self.name, self.fingerprint, self.cache_dir = (
            out,
            ranks,
            name,
            fingerprint,
            cache_dir,
        )
        self.scratch = out / ".scores"

    def _scores(self, index: int) -> Path:
        return self.scratch / f"{index:08d}.npy"

    def filter(
        self, shards: Any, keep: float, settings: dict[str, Any], *, progress: bool, check_content: bool
    ) -> dict[str, Any]:
        ranks = self.ranks
        urls = distinct_shards(expand_urls(shards))[0]
        mine = list(ranks.indices(len(urls)))
        cache = ranks.run(
            lambda: ReferenceCache(
                [urls[i] for i in mine] or urls[:1],
                name=self.name,
                fingerprint=self.fingerprint,
                cache_dir=self.cache_dir,
                max_open=2,  # a shard at a time: memory flat in the pool's size
            )
        )
        model = cache.meta
        metas = ranks.gather((model.fingerprint, model.model, model.scale, model.bias, model.dim))
        if any(m != metas[0] for m in metas):
            raise ValueError(f"the {self.name!r} caches of different ranks' shards hold different models")
        rows = ranks.run(lambda: self._score_shards(cache, urls, mine, progress, check_content))
        total = int(ranks.sum(np.array([sum(rows.values())]))[0])
        if total == 0:
            raise ValueError(f"the {self.name!r} cache of {len(urls)} shards holds no rows: nothing to score")
        k = keep_count(total, keep)
        cut = top_cut(lambda: (np.load(self._scores(i), mmap_mode="r") for i in mine), k, reduce=ranks.sum)
        tied = {i: int((order_keys(np.load(self._scores(i), mmap_mode="r")) == cut.key).sum()) for i in mine}
        every = {i: n for part in ranks.gather(tied) for i, n in part.items()}
        quotas = tie_quotas([every[i] for i in range(len(urls))], cut.tied_kept)
        header = {
            **_header_head(self.name, cache.meta, "similarity"),
            "keep": keep,
            "threshold": cut.threshold,
            "kept": k,
            "total": total,
        }
        ranks.run(lambda: self._write(cache, urls, mine, cut.key, quotas, header, settings))
        return header

    def _score_shards(
        self, cache: ReferenceCache, urls: list[str], mine: list[int], progress: bool, check_content: bool
    ) -> dict[int, int]:
        """Score this rank's shards, one at a time, into the scratch directory; rows per shard."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        rows: dict[int, int] = {}
        bar = progress_bar(
            total=len(mine),
            desc="filter: similarity scores",
            unit="shard",
            disable=not (progress and self.ranks.is_main),
        )
        with bar:
            for j, i in enumerate(mine):
                keys = cache.keys(j)
                digests = _digests(cache, j, keys, check_content)
                emb = cache.lookup(keys, [urls[i]] * len(keys), check_content=False)  # digests: just checked
                scores = reference_scores(emb.take, len(keys), score="similarity") if keys else torch.zeros(0)
                np.save(self._scores(i), scores.numpy().astype(np.float64), allow_pickle=False)
                np.save(self.scratch / f"{i:08d}.digests.npy", digests, allow_pickle=False)
                rows[i] = len(keys)
                bar.update(1)
        return rows

    def _kept_rows(self, i: int, threshold: int, quota: int) -> np.ndarray:
        """The kept rows of shard ``i``: every score above the cut, and its first ``quota`` ties."""
        keys = order_keys(np.load(self._scores(i), mmap_mode="r"))
        mask = keys > np.uint64(threshold)
        mask[np.flatnonzero(keys == np.uint64(threshold))[:quota]] = True
        return mask

    def _write(
        self,
        cache: ReferenceCache,
        urls: list[str],
        mine: list[int],
        threshold: int,
        quotas: list[int],
        header: dict[str, Any],
        settings: dict[str, Any],
    ) -> None:
        ranks, out = self.ranks, self.out
        local: dict[int, dict[str, Any]] = {}
        for j, i in enumerate(mine):
            mask = self._kept_rows(i, threshold, quotas[i])
            keys = np.asarray(cache.keys(j), dtype=str)[mask]
            width = int(max((len(k.encode("utf-8")) for k in keys.tolist()), default=0))
            info = {"url": shard_identity(urls[i]), "bytes": _local_size(urls[i]), "total": len(mask)}
            local[i] = {"info": {**info, "kept": int(mask.sum())}, "width": width}
        every = {i: v for part in ranks.gather(local) for i, v in part.items()}
        counts = [every[i]["info"]["kept"] for i in range(len(urls))]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        width = max(1, max(every[i]["width"] for i in range(len(urls))))
        kept = int(offsets[-1])
        keys_tmp, digests_tmp = out / f"{KEYS}.tmp", out / f"{DIGESTS}.tmp"
        if ranks.is_main:  # the files, full size, before any rank writes its rows into them
            np.lib.format.open_memmap(keys_tmp, mode="w+", dtype=f"S{width}", shape=(kept,)).flush()
            np.lib.format.open_memmap(digests_tmp, mode="w+", dtype=np.uint64, shape=(kept,)).flush()
        ranks.barrier()
        keys_out = np.lib.format.open_memmap(keys_tmp, mode="r+")
        digests_out = np.lib.format.open_memmap(digests_tmp, mode="r+")
        for j, i in enumerate(mine):
            mask = self._kept_rows(i, threshold, quotas[i])
            start, stop = offsets[i], offsets[i + 1]
            keys_out[start:stop] = np.char.encode(np.asarray(cache.keys(j), dtype=str)[mask], "utf-8")
            digests_out[start:stop] = np.load(self.scratch / f"{i:08d}.digests.npy")[mask]
        keys_out.flush()
        digests_out.flush()
        del keys_out, digests_out
        ranks.barrier()
        if ranks.is_main:
            for tmp, final in ((keys_tmp, out / KEYS), (digests_tmp, out / DIGESTS)):
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            header["keys_bytes"] = (out / KEYS).stat().st_size
            header["digests_bytes"] = (out / DIGESTS).stat().st_size
            shards_info = [every[i]["info"] for i in range(len(urls))]
            atomic_bytes(out / HEADER, json.dumps({**header, "shards": shards_info}, indent=1).encode())
            atomic_bytes(
                out / RECORD, json.dumps({"settings": settings, "result": header}, indent=1).encode()
            )
            shutil.rmtree(self.scratch, ignore_errors=True)
        ranks.barrier()


def _score_pool(
    cache: ReferenceCache,
    keys: list[list[str]],
    digests: list[np.ndarray],
    score: str,
    progress: bool,
    **score_kw: Any,
) -> torch.Tensor:
    """``reference_scores`` of every cached row, shard by shard in ``keys`` order: ``[N]``; ``digests``: the
    rows' content digests as the shards hold them now (each lookup checks them, and every row served is
    checked finite: a damaged sidecar names its shard and key, not a pool index)."""
    counts = [len(k) for k in keys]
    flat = [key for shard in keys for key in shard]
    flat_digests = np.concatenate(digests) if digests else np.zeros(0, np.uint64)
    shard_of = np.repeat(np.arange(len(keys)), counts)
    if not flat:
        raise ValueError(
            f"the {cache.name!r} cache of {len(cache.urls)} shards holds no rows: nothing to score"
        )

    def fetch(indices: torch.Tensor) -> Embeddings:
        rows = indices.numpy()
        return cache.lookup(
            [flat[i] for i in rows],
            [cache.urls[s] for s in shard_of[rows]],
            digests=flat_digests[rows].tolist(),
        )

    bar = progress_bar(total=len(flat), desc=f"filter: {score} scores", unit="pair", disable=not progress)
    with bar:
        return reference_scores(fetch, len(flat), score=score, progress=bar.update, **score_kw)


def _write_keep_list(
    out: Path,
    header: dict[str, Any],
    settings: dict[str, Any],
    urls: Sequence[str],
    keys: list[list[str]],
    digests: list[np.ndarray],
    mask: np.ndarray,
) -> None:
    """Write the kept keys and digests (``mask`` over the rows of ``keys``, shard by shard), then the header
    with each shard's counts (it adds the files' sizes to ``header``), then the resolved settings."""
    kept_keys, kept_digests, shards_info, start = [], [], [], 0
    for url, shard_rows, shard_digests in zip(urls, keys, digests, strict=True):
        shard_mask = mask[start : start + len(shard_rows)]
        kept_keys += [key for key, kept in zip(shard_rows, shard_mask, strict=True) if kept]
        kept_digests.append(shard_digests[shard_mask])
        info = {"url": shard_identity(url), "bytes": _local_size(url), "total": len(shard_rows)}
        shards_info.append({**info, "kept": int(shard_mask.sum())})
        start += len(shard_rows)
    out.mkdir(parents=True, exist_ok=True)
    encoded = np.char.encode(np.asarray(kept_keys, dtype=str), "utf-8")
    header["keys_bytes"] = atomic_bytes(out / KEYS, encoded)
    header["digests_bytes"] = atomic_bytes(out / DIGESTS, np.concatenate(kept_digests).astype(np.uint64))
    atomic_bytes(out / HEADER, json.dumps({**header, "shards": shards_info}, indent=1).encode())
    atomic_bytes(out / RECORD, json.dumps({"settings": settings, "result": header}, indent=1).encode())


def _scored_digests(cache: ReferenceCache, shard: int, keys: list[str]) -> np.ndarray:
    """The ``content_digest`` of each of ``keys`` (rows of ``cache``'s shard ``shard``) as the shard holds it
    now, uint64 ``[len(keys)]``; a ValueError (one line, naming the shard and key) when the shard lacks a key
    or a sample's image or caption bytes are not those its row was embedded from. Reads the shard once."""
    url = cache.urls[shard]
    content = shard_content(url)
    lacking = [key for key in keys if key not in content]
    if lacking:
        raise ValueError(
            f"the {cache.name!r} cache of shard {url} has a row for sample key {lacking[0]!r} "
            f"({len(lacking)} such) that the shard does not hold; run `jestclip cache-reference` on it"
        )
    digests = [content[key] for key in keys]
    cache.lookup(keys, [url] * len(keys), digests=digests)  # a SidecarError names a changed sample
    return np.asarray(digests, np.uint64)


def _local_size(url: str) -> int | None:
    """A local shard's byte size; None for a shard behind a URL (whose identity is the URL itself)."""
    return os.path.getsize(url) if shard_identity(url) == os.path.abspath(url) else None


class KeepList:
    """A keep list written by ``filter_shards``, read from its directory; ``keep(url, key, digest)`` (calling
    the object) says whether the stream reads sample ``key`` of shard ``url``, and checks a kept sample's
    content digest.

    Opening reads the header and checks the arrays' sizes; ``check(urls)`` checks it against the shards a
    run reads. A shard's keys and digests are read when the stream first asks about it (one shard's at a
    time); pickling (DataLoader workers) carries the header only. ``sha256`` is that of ``keep.json``, which
    records the arrays' sizes: a keep list written again at the same path has another (a run records it).
    """

    def __init__(self, path: str | Path) -> None:
        """ValueError (one line, naming the file) for a directory without a complete, readable keep list."""
        self.path = Path(path)
        header_path = self.path / HEADER
        if not self.path.is_dir():
            raise ValueError(f"keep list {self.path} is not a directory written by `jestclip filter`")
        if not header_path.exists():
            raise ValueError(
                f"keep list {self.path} holds no {HEADER}: run `jestclip filter --out {self.path}`"
            )
        try:
            raw = header_path.read_bytes()
            header = json.loads(raw)
            if header.get("format") in _OLD_FORMATS:
                raise _OldFormat(header["format"])
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
            self.shards = [
                {
                    "url": str(s["url"]),
                    "bytes": None if s["bytes"] is None else int(s["bytes"]),
                    **{k: int(s[k]) for k in ("total", "kept")},
                }
                for s in header["shards"]
            ]
            self.kept = int(header["kept"])
            sizes = {KEYS: int(header["keys_bytes"]), DIGESTS: int(header["digests_bytes"])}
        except _OldFormat as old:
            raise ValueError(
                f"keep list {header_path} is of format {old}, without the content digests that show a "
                f"changed shard; run `jestclip filter` again (format {FORMAT})"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
            raise ValueError(f"keep list {header_path} is corrupt ({type(exn).__name__}: {exn})") from None
        if sum(s["kept"] for s in self.shards) != self.kept:
            raise ValueError(
                f"keep list {header_path} is corrupt: its shards' kept counts do not sum to kept"
            )
        for name, expected in sizes.items():
            size = (self.path / name).stat().st_size if (self.path / name).exists() else None
            if size != expected:
                found = "missing" if size is None else f"{size} bytes, expected {expected}"
                raise ValueError(f"keep list {self.path / name} is truncated ({found})")
        self.header = header
        self.sha256 = hashlib.sha256(raw).hexdigest()
        offsets = np.cumsum([0] + [s["kept"] for s in self.shards])
        self._span = {s["url"]: (int(offsets[i]), int(offsets[i + 1])) for i, s in enumerate(self.shards)}
        self._current: tuple[str, dict[str, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_current": None}

    def __len__(self) -> int:
        """Pairs kept over all shards."""
        return self.kept

    def keys(self, url: str) -> frozenset[str]:
        """The kept sample keys of shard ``url``; a ValueError for a shard the keep list is not for."""
        return frozenset(self._digests(url))

    def _digests(self, url: str) -> dict[str, int]:
        """Kept key -> recorded content digest of shard ``url`` (the last shard asked about is held)."""
        where = shard_identity(url)
        if self._current is not None and self._current[0] == where:
            return self._current[1]
        if where not in self._span:
            raise ValueError(f"shard {url} is not in keep list {self.path}")
        first, last = self._span[where]
        arrays = []
        for name, kind in ((KEYS, "S"), (DIGESTS, "u")):
            try:
                array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exn:
                raise ValueError(
                    f"keep list {self.path / name} is corrupt ({type(exn).__name__}: {exn})"
                ) from None
            if array.ndim != 1 or array.dtype.kind != kind or len(array) != self.kept:
                raise ValueError(f"keep list {self.path / name} is corrupt: {array.dtype} {array.shape}")
            arrays.append(array[first:last].tolist())
        kept = {key.decode("utf-8"): int(digest) for key, digest in zip(*arrays, strict=True)}
        self._current = (where, kept)
        return kept

    def __call__(self, url: str, key: str, digest: int | None = None) -> bool:
        """Whether sample ``key`` of shard ``url`` is kept; ``digest``: its ``decode.content_digest`` as read
        now (the stream always passes it; None: membership only, for counting from tar headers). A kept
        sample whose digest is not the recorded one is a ``KeptSampleChangedError`` (one line, naming the
        shard and key): its score came from other image or caption bytes."""
        recorded = self._digests(url).get(key)
        if recorded is None:
            return False
        if digest is not None and recorded != digest:
            raise KeptSampleChangedError(
                f"shard {url} changed since keep list {self.path} was written: kept sample key {key!r} has "
                "other image or caption bytes; run `jestclip cache-reference` and `jestclip filter` again"
            )
        return True

    def shard_read(self, url: str, keys: set[str]) -> None:
        """Called by the stream once it has read shard ``url`` whole, with every sample key it held: a
        ``KeptSampleChangedError`` (one line) naming a kept key the shard no longer holds. So the keep list is
        checked against each shard where the shard is read, not by reading every tar header at startup."""
        absent = sorted(set(self._digests(url)) - keys)
        if absent:
            raise KeptSampleChangedError(
                f"keep list {self.path} keeps sample key {absent[0]!r} of shard {url} ({len(absent)} such), "
                "which the shard does not hold; run `jestclip cache-reference` and `jestclip filter` again"
            )

    def check(self, urls: Sequence[str], own: Sequence[str] | None = None) -> None:
        """A ValueError (one line) unless the keep list was written for exactly the shards ``urls`` (by
        ``shard_identity``, any order) and no local one of ``own`` (default: all) changed in size since — a
        stat per shard, no shard read: the kept samples' content digests are checked as the stream reads
        them (``__call__``) and each shard's kept keys once it has read it whole (``shard_read``)."""
        here = {shard_identity(url): url for url in distinct_shards(expand_urls(list(urls)))[0]}
        there = {s["url"]: s for s in self.shards}
        missing = [url for where, url in here.items() if where not in there]
        if missing:
            raise ValueError(
                f"keep list {self.path} was written for other shards: shard {missing[0]} ({len(missing)} of "
                f"{len(here)} such) is not in it; run `jestclip filter` on the training shards"
            )
        extra = [where for where in there if where not in here]
        if extra:
            raise ValueError(
                f"keep list {self.path} was written for other shards: its shard {extra[0]} ({len(extra)} "
                f"such) is not among the {len(here)} training shards"
            )
        for url in here.values() if own is None else own:
            recorded, size = there[shard_identity(url)]["bytes"], _local_size(url)
            if recorded is None or size is None:
                continue
            if size != recorded:
                raise ValueError(
                    f"shard {url} changed since keep list {self.path} was written ({recorded} bytes then, "
                    f"{size} now); run `jestclip filter` again"
                )


class _OldFormat(Exception):
    """A keep list header of an earlier format (its name the message)."""
