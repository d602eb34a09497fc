"""The keep list of a static reference-score filter: which samples of which shards training reads.

``filter_shards`` scores every pair of a pool once from its cached reference embeddings
(``selection.filter.reference_scores``), keeps a fraction Q of the whole pool (``keep_mask``) and writes the
keep list; ``KeepList`` reads it back and, passed to ``SuperBatchStream(keep=...)``, makes the stream skip
every other sample (as ``not_kept``) before decoding it. What is kept and why: ``jestclip.selection.filter``
and docs/selection.md, "Static reference-score filter".

Format (``jestclip-keeplist/1``), a directory holding:

- ``keep.keys.npy``: the kept sample keys, UTF-8 as fixed-width bytes (``S<w>``), shard after shard in the
  header's shard order, sorted within each shard;
- ``keep.json``: the header, written last (it marks the keep list complete): the reference cache (name,
  model, fingerprint, logit scale and bias), the score (``similarity`` or ``loss``, its units, and for
  ``loss`` the loss, batch size and seed), the keep fraction Q of the whole pool, the threshold (the lowest
  kept score), pairs kept and scored, the byte size of the keys file, and per shard its absolute path, byte
  size, pairs scored (the shard's cached rows) and kept;
- ``filter.json``: the resolved settings of the command that wrote it, with its counts (a record; never
  read back).

Files are written to ``*.tmp``, fsynced and renamed; an existing keep list is never overwritten.
Samples of a shard without a cached reference row (undecodable when cached) are not scored and so not kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jestclip.data.files import atomic_bytes
from jestclip.data.loader import expand_urls
from jestclip.data.progress import progress as progress_bar
from jestclip.data.refcache import ReferenceCache, shard_keys
from jestclip.selection import Embeddings
from jestclip.selection.filter import keep_mask, reference_scores, score_threshold

__all__ = ["FORMAT", "HEADER", "KEYS", "KeepList", "filter_shards"]

FORMAT = "jestclip-keeplist/1"
HEADER, KEYS, RECORD = "keep.json", "keep.keys.npy", "filter.json"
SCORE_UNITS = {"similarity": "cosine similarity", "loss": "minus the pair's loss, nats"}


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
    progress: bool = True,
) -> dict[str, Any]:
    """Score every cached pair of ``shards`` with the reference cache ``name``, keep fraction ``keep`` of the
    whole pool, write the keep list into directory ``out``; return the header (without its shard list).

    score, loss, batch_size, seed: as ``reference_scores`` (batch_size and seed matter for "loss" only).
    fingerprint: the reference model the cache must hold (None: any). A ValueError (one line) for a missing,
    stale or foreign cache (``ReferenceCache``), a keep fraction that keeps nothing, or an ``out`` that is a
    file or already holds a keep list.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    if (out / HEADER).exists():
        raise FileExistsError(f"{out / HEADER} already holds a keep list; choose another --out or remove it")
    cache = ReferenceCache(shards, name=name, fingerprint=fingerprint)
    keys = [cache.keys(i) for i in range(len(cache.urls))]
    counts = [len(k) for k in keys]
    flat = [key for shard in keys for key in shard]
    shard_of = np.repeat(np.arange(len(keys)), counts)
    if not flat:
        raise ValueError(f"the {name!r} cache of {len(cache.urls)} shards holds no rows: nothing to score")

    def fetch(indices: torch.Tensor) -> Embeddings:
        rows = indices.numpy()
        return cache.lookup([flat[i] for i in rows], [cache.urls[s] for s in shard_of[rows]])

    bar = progress_bar(total=len(flat), desc=f"filter: {score} scores", unit="pair", disable=not progress)
    with bar:
        scores = reference_scores(
            fetch, len(flat), score=score, loss=loss, batch_size=batch_size, seed=seed, progress=bar.update
        )
    mask = keep_mask(scores, keep).numpy()
    kept_keys, shards_info, start = [], [], 0
    for url, shard_rows in zip(cache.urls, keys, strict=True):
        shard_mask = mask[start : start + len(shard_rows)]
        kept_keys += [key for key, kept in zip(shard_rows, shard_mask, strict=True) if kept]
        info = {"url": os.path.abspath(url), "bytes": os.path.getsize(url), "total": len(shard_rows)}
        shards_info.append({**info, "kept": int(shard_mask.sum())})
        start += len(shard_rows)
    meta = cache.meta
    header = {
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
        **({"loss": loss, "batch_size": batch_size, "seed": seed} if score == "loss" else {}),
        "keep": keep,
        "threshold": score_threshold(scores, keep),
        "kept": int(mask.sum()),
        "total": len(flat),
    }
    out.mkdir(parents=True, exist_ok=True)
    encoded = np.char.encode(np.asarray(kept_keys, dtype=str), "utf-8")
    header["keys_bytes"] = atomic_bytes(out / KEYS, encoded)
    atomic_bytes(out / HEADER, json.dumps({**header, "shards": shards_info}, indent=1).encode())
    settings = {"shards": [str(s) for s in ([shards] if isinstance(shards, str | Path) else shards)]}
    settings |= {"out": str(out), "keep": keep, "score": score, "loss": loss, "batch_size": batch_size}
    settings |= {"seed": seed, "reference_cache": name, "fingerprint": fingerprint}
    atomic_bytes(out / RECORD, json.dumps({"settings": settings, "result": header}, indent=1).encode())
    return header


class KeepList:
    """A keep list written by ``filter_shards``, read from its directory; ``keep(url, key)`` (calling the
    object) says whether the stream reads sample ``key`` of shard ``url``.

    Opening reads the header and checks the keys file's size; ``check(urls)`` checks it against the shards a
    run reads. A shard's keys are read when the stream first asks about it (one shard's set at a time);
    pickling (DataLoader workers) carries the header only.
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
            header = json.loads(header_path.read_bytes())
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
            self.shards = [
                {k: (str if k == "url" else int)(s[k]) for k in ("url", "bytes", "total", "kept")}
                for s in header["shards"]
            ]
            self.kept, self.keys_bytes = int(header["kept"]), int(header["keys_bytes"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
            raise ValueError(f"keep list {header_path} is corrupt ({type(exn).__name__}: {exn})") from None
        if sum(s["kept"] for s in self.shards) != self.kept:
            raise ValueError(
                f"keep list {header_path} is corrupt: its shards' kept counts do not sum to kept"
            )
        size = (self.path / KEYS).stat().st_size if (self.path / KEYS).exists() else None
        if size != self.keys_bytes:
            found = "missing" if size is None else f"{size} bytes, expected {self.keys_bytes}"
            raise ValueError(f"keep list {self.path / KEYS} is truncated ({found})")
        self.header = header
        offsets = np.cumsum([0] + [s["kept"] for s in self.shards])
        self._span = {s["url"]: (int(offsets[i]), int(offsets[i + 1])) for i, s in enumerate(self.shards)}
        self._current: tuple[str, frozenset[str]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_current": None}

    def __len__(self) -> int:
        """Pairs kept over all shards."""
        return self.kept

    def keys(self, url: str) -> frozenset[str]:
        """The kept sample keys of shard ``url``; a ValueError for a shard the keep list is not for."""
        where = os.path.abspath(url)
        if self._current is not None and self._current[0] == where:
            return self._current[1]
        if where not in self._span:
            raise ValueError(f"shard {url} is not in keep list {self.path}")
        first, last = self._span[where]
        try:
            array = np.load(self.path / KEYS, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exn:
            raise ValueError(
                f"keep list {self.path / KEYS} is corrupt ({type(exn).__name__}: {exn})"
            ) from None
        if array.ndim != 1 or array.dtype.kind != "S" or len(array) != self.kept:
            raise ValueError(f"keep list {self.path / KEYS} is corrupt: {array.dtype} {array.shape}")
        kept = frozenset(key.decode("utf-8") for key in array[first:last].tolist())
        self._current = (where, kept)
        return kept

    def __call__(self, url: str, key: str) -> bool:
        return key in self.keys(url)

    def check(self, urls: Sequence[str]) -> None:
        """A ValueError (one line) unless the keep list was written for exactly the shards ``urls`` (as
        absolute paths, any order), none changed in size since, and each holds every key kept of it (its tar
        headers are read)."""
        here = {os.path.abspath(url): url for url in expand_urls(list(urls))}
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
        for where, url in here.items():
            recorded, size = there[where]["bytes"], os.path.getsize(url)
            if size != recorded:
                raise ValueError(
                    f"shard {url} changed since keep list {self.path} was written ({recorded} bytes then, "
                    f"{size} now); run `jestclip filter` again"
                )
            absent = sorted(self.keys(url) - shard_keys(url))
            if absent:
                raise ValueError(
                    f"keep list {self.path} keeps sample key {absent[0]!r} of shard {url} ({len(absent)} "
                    "such), which the shard does not hold"
                )
