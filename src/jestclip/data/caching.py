"""Caching a frozen reference model's embeddings: every shard's samples embedded once, one sidecar per shard.

``cache_reference`` decides per shard whether its sidecar (format: ``refcache``) is up to date, reads and
decodes the shards that need embedding (in DataLoader workers, whole shards each), embeds their batches with
the caller's ``Embedder`` and writes each shard's sidecar when its last batch is in. Under torchrun every
rank caches its share of the shards. ``jestclip.train.reference`` builds the embedder from an open_clip
model; the ``jestclip cache-reference`` command calls that. ``refcache.ReferenceCache`` reads the sidecars.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.gopen import gopen

from jestclip.data.files import NotWritableError, check_writable
from jestclip.data.progress import progress
from jestclip.data.ranks import Ranks
from jestclip.data.refcache import (
    CacheMeta,
    SidecarError,
    _array_path,
    _base,
    _check_header,
    _compare_content,
    _is_local,
    _old_path,
    _open_arrays,
    _read_header,
    shard_content,
    sidecar_path,
    write_sidecar,
)
from jestclip.data.shardlist import distinct_shards, expand_urls
from jestclip.data.stream import SuperBatch, SuperBatchStream

__all__ = ["Embedder", "cache_reference"]

# images [n, 3, H, W], n captions -> L2-normalised (image [n, D], text [n, D]), any device and float dtype
Embedder = Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]


def _check_rows(
    url: str, name: str, keys: np.ndarray, emb: np.ndarray, cache_dir: str | Path | None, chunk: int = 4096
) -> None:
    """SidecarError naming the first key whose cached embedding is not finite (reads the whole array, a
    chunk of rows at a time): a sidecar damaged after it was written, which ``cache-reference`` rewrites."""
    for start in range(0, len(emb), chunk):
        bad = np.flatnonzero(~np.isfinite(emb[start : start + chunk]).all(axis=(1, 2)))
        if bad.size:
            key = keys[start + int(bad[0])].decode("utf-8")
            raise SidecarError(
                f"the cached {name!r} embedding of sample key {key!r} of shard {url} is not finite: "
                f"{_array_path(url, name, 'emb', cache_dir)} was damaged after it was written"
            )


def _existing(
    url: str,
    name: str,
    fingerprint: str,
    model: str,
    cache_dir: str | Path | None,
    *,
    read: str | None = None,
) -> tuple[str, str]:
    """The state of ``url``'s sidecar for ``cache_reference``: ("ok" | "missing" | "old" | "stale" | "changed"
    | "broken", what is wrong); "ok" means complete, up to date, readable, every row finite and holding the
    shard's samples as they are now (the shard is read, not decoded)."""
    try:
        header = _read_header(url, name, cache_dir)
    except SidecarError as exn:
        old = _old_path(url, name, cache_dir).exists() or "without the content digests" in exn.problem
        if sidecar_path(url, name, cache_dir).exists() and not old:
            return "broken", exn.problem
        return ("old" if old else "missing"), exn.problem
    same_model = (header.meta.fingerprint, header.meta.model) == (fingerprint, model)  # model: NAME@TAG
    if not same_model:  # (the tag sets the preprocessing)
        return "stale", ""
    try:
        _check_header(url, name, header, cache_dir)
        keys, emb, digests = _open_arrays(url, name, header, cache_dir)
        _check_rows(url, name, keys, emb, cache_dir)
        _compare_content(url, name, header, keys, digests, sidecar_path(url, name, cache_dir), read=read)
    except SidecarError as exn:
        return ("changed" if "changed since" in exn.problem else "broken"), exn.problem
    return "ok", ""


def _check_sidecar_places(
    urls: Sequence[str], name: str, fingerprint: str, model: str, cache_dir: str | Path | None
) -> None:
    """Before any shard is embedded: a ``NotWritableError`` naming a directory the sidecars must be written
    into that cannot be written (a read-only dataset mount), with the way to write them elsewhere. A
    directory whose shards all have a complete sidecar of this model (headers only) may be read-only:
    there may be nothing to write (a shard found changed later fails at its write, in one line too)."""
    places: dict[Path, list[str]] = {}
    for url in urls:
        places.setdefault(sidecar_path(url, name, cache_dir).parent, []).append(url)
    hint = (
        "choose another --cache-dir"
        if cache_dir is not None
        else "pass --cache-dir DIR to write the sidecars into a directory of your own (library: "
        "cache_dir=DIR; then train with reference_cache_dir=DIR)"
    )
    for place, shards in places.items():
        try:
            check_writable(place, f"the {name!r} sidecars' directory", hint)
        except NotWritableError:
            if any(not _header_of(url, name, fingerprint, model, cache_dir) for url in shards):
                raise


def _header_of(url: str, name: str, fingerprint: str, model: str, cache_dir: str | Path | None) -> bool:
    """Whether ``url`` has a readable sidecar header of this model (nothing more is checked)."""
    try:
        header = _read_header(url, name, cache_dir)
    except SidecarError:
        return False
    return (header.meta.fingerprint, header.meta.model) == (fingerprint, model)


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
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every decodable sample of every shard with ``embed``; write one sidecar per shard.

    embed: ``embed(images [n, 3, H, W], n captions) -> (image [n, D], text [n, D])``, L2-normalised, on any
    device and in any float dtype (``jestclip.models.reference_embedder`` makes one from an open_clip model).
    model_name, fingerprint, scale, bias: what the sidecars record about the reference model (``scale`` is
    the logit multiplier ``exp(logit_scale)``). transform: image preprocessing of the model.
    cache_dir: where the sidecars go (see ``sidecar_path``); needed for shards behind a URL.
    num_workers: DataLoader processes that read and decode shards (whole shards each) while the model embeds;
    pin_memory: page-locked batches for a non-blocking copy to a GPU.

    Under torchrun every rank caches its share of the shards (``ranks.Ranks.part``: the shard list as
    given, ``[rank::world]``) and every rank returns the counts summed over ranks. A shard's samples are
    embedded in batches of ``batch_size`` in shard order whatever the rank or worker, so the sidecars are
    those one process writes, byte for byte. A shard behind a URL is read once (downloaded to a temporary
    file).

    Resumable and repairing: a shard whose sidecar is complete, holds this ``fingerprint`` and the shard's
    samples as they are now (keys, image and caption bytes: each kept shard is read again, not decoded) is
    kept; one of a shard that changed is rewritten and counted as changed; a corrupt, truncated, mis-keyed
    or damaged one (a non-finite row) is rewritten and counted as repaired; one of an earlier format is
    replaced. A shard listed under several names (a symlink, ``dir/./00000.tar``) is cached once, by its
    first, and the others counted as ``duplicate_shard``. Returns counts: sidecars written (changed and
    repaired among them) and kept, samples embedded, skips by reason, and ``seconds``: how long the slowest
    rank checked, read and embedded its shards (process startup and model loading aside).
    """
    ranks = Ranks.current()
    every, duplicates = distinct_shards(expand_urls(shards))  # a shard under two names is cached once
    urls = ranks.part(every)

    def check() -> None:
        for url in urls:
            _base(url, name, cache_dir)  # a shard behind a URL without a cache directory: say so before work
        _check_sidecar_places(urls, name, fingerprint, model_name, cache_dir)

    ranks.run(check)
    summary: dict[str, Any] = {"written": 0, "changed": 0, "repaired": 0, "kept": 0, "samples": 0}
    summary["skipped"] = Counter({"duplicate_shard": duplicates} if duplicates and ranks.is_main else {})
    template = CacheMeta(fingerprint, model_name, float(scale), float(bias), 0, None)
    job = _CacheJob(embed, name, template, transform, batch_size, cache_dir, summary["skipped"])
    started = time.perf_counter()
    ranks.run(lambda: job.run(urls, summary, num_workers, pin_memory, progress and ranks.is_main))
    summary["seconds"] = time.perf_counter() - started
    parts = ranks.gather({**summary, "skipped": dict(summary["skipped"])})
    total: dict[str, Any] = {k: sum(p[k] for p in parts) for k in summary if k not in ("skipped", "seconds")}
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part["skipped"])
    # the slowest rank's time to check, read and embed its shards (process startup and model loading aside)
    return {**total, "skipped": dict(skipped), "seconds": round(max(p["seconds"] for p in parts), 3)}


class _CacheJob:
    """One rank's caching: its shards are checked and, where their sidecar is not up to date, read and decoded
    by ``_ShardWork`` (in DataLoader workers, a whole shard per worker at a time) while this process embeds
    their batches and writes each shard's sidecar once its last batch is in."""

    def __init__(
        self,
        embed: Embedder,
        name: str,
        template: CacheMeta,
        transform: Callable,
        batch_size: int,
        cache_dir: str | Path | None,
        skipped: Counter[str],
    ) -> None:
        self.embed, self.name, self.template, self.transform = embed, name, template, transform
        self.batch_size, self.cache_dir, self.skipped = batch_size, cache_dir, skipped

    def run(
        self,
        urls: Sequence[str],
        summary: dict[str, Any],
        num_workers: int,
        pin_memory: bool,
        progress_: bool,
    ) -> None:
        work = _ShardWork(urls, self.name, self.template, self.cache_dir, self.batch_size, self.transform)
        loader = DataLoader(work, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        rows: dict[str, _Rows] = {}
        bar = progress(total=len(urls), desc=f"cache {self.name}", unit="shard", disable=not progress_)
        with bar:
            for url, batch, done in loader:
                part = rows.setdefault(url, _Rows())
                if batch is not None:
                    with torch.no_grad():
                        image, text = self.embed(batch.images, batch.texts)
                    _check_embeddings(image, text, batch.keys, url)
                    part.add(batch, image, text)
                    self.skipped.update(batch.skipped)
                    continue
                rows.pop(url)
                state = done["state"]
                if state == "ok":
                    summary["kept"] += 1
                else:
                    summary["samples"] += self._write(url, part, done["content"])
                    summary["written"] += 1
                    summary["repaired"] += state == "broken"
                    summary["changed"] += state == "changed"
                    if state == "old":
                        _old_path(url, self.name, self.cache_dir).unlink(missing_ok=True)
                bar.update(1)

    def _write(self, url: str, part: _Rows, content: dict[str, int]) -> int:
        """Write shard ``url``'s sidecar from its embedded rows; the rows written."""
        image, text = part.arrays()
        meta = CacheMeta(
            self.template.fingerprint,
            self.template.model,
            self.template.scale,
            self.template.bias,
            int(image.shape[1]) if part.keys else 0,
            os.path.getsize(url) if _is_local(url) else None,
        )
        rows = set(part.keys)
        write_sidecar(
            url,
            self.name,
            part.keys,
            image,
            text,
            meta,
            digests=part.digests,
            skipped={k: d for k, d in content.items() if k not in rows},  # with their digests
            cache_dir=self.cache_dir,
        )
        return len(part.keys)


class _Rows:
    """A shard's embedded rows as its batches come in (keys, content digests, float16 embeddings)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.digests: list[int] = []
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray] = []

    def add(self, batch: SuperBatch, image: Tensor, text: Tensor) -> None:
        self.keys += batch.keys
        self.digests += batch.digests
        self.images.append(image.to("cpu", torch.float16).numpy())
        self.texts.append(text.to("cpu", torch.float16).numpy())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.images:
            return np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16)
        return np.concatenate(self.images), np.concatenate(self.texts)


class _ShardWork(IterableDataset):
    """Each shard's sidecar state, read and decoded where it needs embedding: ``(url, batch, None)`` for each
    batch of a shard that does (in shard order; a batch never mixes shards), then ``(url, None, done)``, with
    ``done`` the sidecar's state (``_existing``) and, unless it is up to date, the shard's ``shard_content``
    (every sample's digest: those its decoding skipped are recorded with theirs). With DataLoader workers
    each worker takes whole shards; a shard behind a URL is downloaded once into a temporary file and read
    there (one at a time per worker)."""

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        template: CacheMeta,
        cache_dir: str | Path | None,
        batch_size: int,
        transform: Callable,
    ) -> None:
        super().__init__()
        self.urls, self.name, self.template, self.cache_dir = list(urls), name, template, cache_dir
        self.batch_size, self.transform = batch_size, transform

    def __iter__(self) -> Iterator[tuple[str, SuperBatch | None, dict[str, Any] | None]]:
        info = get_worker_info()
        mine = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in mine:
            with _readable(url) as local:
                state, problem = _existing(
                    url, self.name, self.template.fingerprint, self.template.model, self.cache_dir, read=local
                )
                if state == "ok":
                    yield url, None, {"state": state}
                    continue
                if state in ("broken", "changed"):
                    tqdm.write(f"cache-reference: rewriting: {problem}", file=sys.stderr)
                stream = SuperBatchStream(
                    [local],
                    batch_size=self.batch_size,
                    shuffle_shards=False,
                    transform=self.transform,
                    rank=0,  # this dataset deals whole shards to the ranks and the workers
                    world_size=1,
                    split_workers=False,
                )
                for batch in stream:
                    yield url, batch, None
                yield url, None, {"state": state, "content": shard_content(local)}


@contextlib.contextmanager
def _readable(url: str) -> Iterator[str]:
    """Where to read shard ``url``: itself when local, else a copy downloaded once into a temporary file,
    removed afterwards (so that a ``pipe:`` or ``http`` shard is fetched once, however often it is read)."""
    if _is_local(url):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="jestclip-shard-") as scratch:
        path = Path(scratch) / "shard.tar"
        with gopen(url, "rb") as stream, open(path, "wb") as out:
            shutil.copyfileobj(stream, out)
        yield str(path)


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
