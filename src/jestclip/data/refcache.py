"""The reference-embedding cache: a frozen reference model's embeddings stored next to each shard, by key.

For shard ``dir/00000.tar`` and cache name ``reference`` the sidecar is ``dir/00000.reference.npz`` with
arrays ``keys`` (str), ``image`` and ``text`` (float16 ``[n, D]``, L2-normalised) and a JSON ``meta``: model
fingerprint, name, logit scale and bias, dim, and the shard's byte size when it was cached.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from jestclip.data.loader import SuperBatchStream, expand_urls
from jestclip.selection import Embeddings

__all__ = ["CacheMeta", "Embedder", "ReferenceCache", "cache_reference", "sidecar_path"]

# images [n, 3, H, W], n captions -> L2-normalised (image [n, D], text [n, D]), any device and float dtype
Embedder = Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]


def sidecar_path(shard: str | Path, name: str) -> Path:
    """Where cache ``name`` of ``shard`` lives: ``dir/00000.tar`` -> ``dir/00000.NAME.npz``."""
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


def _read_meta(path: Path) -> CacheMeta:
    with np.load(path, allow_pickle=False) as data:
        return CacheMeta(**json.loads(str(data["meta"])))


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
    Resumable: a shard whose sidecar holds this ``fingerprint`` and matches the shard's size is skipped.
    Returns counts: shards written and skipped, samples embedded, decode skips by reason.
    """
    urls = expand_urls(shards)
    summary: dict[str, Any] = {"written": 0, "kept": 0, "samples": 0, "skipped": Counter()}
    for url in tqdm(urls, desc=f"cache {name}", unit="shard"):
        target = sidecar_path(url, name)
        size = os.path.getsize(url)
        if target.exists():
            meta = _read_meta(target)
            if meta.fingerprint == fingerprint and meta.shard_bytes == size:
                summary["kept"] += 1
                continue
        keys: list[str] = []
        images: list[np.ndarray] = []
        texts: list[np.ndarray] = []
        stream = SuperBatchStream([url], batch_size=batch_size, shuffle_shards=False, transform=transform)
        for batch in stream:
            with torch.no_grad():
                image, text = embed(batch.images, batch.texts)
            _check_embeddings(image, text, len(batch.keys))
            keys += batch.keys
            images.append(image.to("cpu", torch.float16).numpy())
            texts.append(text.to("cpu", torch.float16).numpy())
            summary["skipped"].update(batch.skipped)
        dim = int(images[0].shape[1]) if images else 0
        meta = CacheMeta(fingerprint, model_name, float(scale), float(bias), dim, size)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                keys=np.array(keys, dtype=str),
                image=np.concatenate(images) if images else np.zeros((0, 0), np.float16),
                text=np.concatenate(texts) if texts else np.zeros((0, 0), np.float16),
                meta=np.array(json.dumps(meta.__dict__)),
            )
        os.replace(tmp, target)
        summary["written"] += 1
        summary["samples"] += len(keys)
    summary["skipped"] = dict(summary["skipped"])
    return summary


def _check_embeddings(image: Tensor, text: Tensor, n: int) -> None:
    """ValueError unless ``image`` and ``text`` are ``[n, D]`` and L2-normalised row by row."""
    if image.ndim != 2 or image.shape[0] != n or text.shape != image.shape:
        raise ValueError(
            f"embed returned image {tuple(image.shape)} and text {tuple(text.shape)} for {n} samples; "
            "expected two [n, D] tensors"
        )
    for kind, emb in (("image", image), ("text", text)):
        norms = emb.float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
            raise ValueError(f"embed returned {kind} embeddings that are not L2-normalised")


class ReferenceCache:
    """Cached reference embeddings of a set of shards, checked up front and joined to samples by key."""

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        name: str = "reference",
        fingerprint: str | None = None,
        dim: int | None = None,
    ) -> None:
        """Load every shard's sidecar; ValueError if one is missing, stale, or disagrees with the others.

        fingerprint, dim: what the caller expects (e.g. the reference model it was told to use).
        """
        self.name = name
        self.rows: dict[str, int] = {}  # key -> row of self.image / self.text
        images: list[np.ndarray] = []
        texts: list[np.ndarray] = []
        metas: list[tuple[str, CacheMeta]] = []
        for url in expand_urls(shards):
            path = sidecar_path(url, name)
            if not path.exists():
                raise ValueError(
                    f"no cached {name!r} embeddings for shard {url} (expected {path}); run cache-reference"
                )
            with np.load(path, allow_pickle=False) as data:
                meta = CacheMeta(**json.loads(str(data["meta"])))
                if meta.shard_bytes != os.path.getsize(url):
                    raise ValueError(
                        f"shard {url} changed since its {name!r} embeddings were cached ({path})"
                    )
                offset = len(self.rows)
                self.rows.update((key, offset + row) for row, key in enumerate(data["keys"].tolist()))
                images.append(data["image"])
                texts.append(data["text"])
            metas.append((url, meta))
        if not metas:
            raise ValueError("no shards given")
        first_url, first = metas[0]
        for url, meta in metas[1:]:
            if (meta.fingerprint, meta.dim) != (first.fingerprint, first.dim):
                theirs = f"model {meta.fingerprint}, dim {meta.dim}"
                ours = f"model {first.fingerprint}, dim {first.dim}"
                raise ValueError(
                    f"{name!r} embeddings of {url} ({theirs}) differ from those of {first_url} ({ours}); "
                    "run cache-reference again"
                )
        if fingerprint is not None and first.fingerprint != fingerprint:
            raise ValueError(
                f"cached {name!r} embeddings come from model {first.fingerprint} ({first.model}), "
                f"not the expected {fingerprint}"
            )
        if dim is not None and first.dim != dim:
            raise ValueError(f"cached {name!r} embeddings have dim {first.dim}, expected {dim}")
        self.meta = first
        self.image = np.concatenate(images)  # [n, D] float16, all shards
        self.text = np.concatenate(texts)

    def lookup(self, keys: Sequence[str], *, device: str | torch.device = "cpu") -> Embeddings:
        """Cached embeddings of ``keys`` in order, float32 on ``device``; a ValueError names a missing key."""
        rows = np.fromiter((self.rows.get(key, -1) for key in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any():
            missing = keys[int(np.flatnonzero(rows < 0)[0])]
            raise ValueError(f"sample key {missing!r} has no cached {self.name!r} embedding")
        return Embeddings(
            torch.from_numpy(self.image[rows]).to(device).float(),  # fp16 across the bus, fp32 on the device
            torch.from_numpy(self.text[rows]).to(device).float(),
            self.meta.scale,
            self.meta.bias,
        )
