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
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from jestclip.data.loader import SuperBatchStream, expand_urls
from jestclip.selection import Embeddings

__all__ = ["CacheMeta", "ReferenceCache", "cache_reference", "sidecar_path"]


def sidecar_path(shard: str | Path, name: str) -> Path:
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.{name}.npz")


@dataclass(frozen=True)
class CacheMeta:
    fingerprint: str
    model: str
    scale: float
    bias: float
    dim: int
    shard_bytes: int


def _read_meta(path: Path) -> CacheMeta:
    with np.load(path, allow_pickle=False) as data:
        return CacheMeta(**json.loads(str(data["meta"])))


@torch.no_grad()
def cache_reference(
    model: nn.Module,
    shards: str | Path | Sequence[str | Path],
    *,
    model_name: str,
    fingerprint: str,
    tokenize: Callable[[list[str]], Tensor],
    transform: Callable,
    name: str = "reference",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Embed every decodable sample of every shard with the frozen ``model``; write one sidecar per shard.

    Resumable: a shard whose sidecar holds this ``fingerprint`` and matches the shard's size is skipped.
    Returns counts: shards written and skipped, samples embedded, decode skips by reason.
    """
    from jestclip.models.factory import logit_params

    model = model.to(device).eval()
    scale, bias = (float(t) for t in logit_params(model))
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
            image = F.normalize(model.encode_image(batch.images.to(device)), dim=-1)
            text = F.normalize(model.encode_text(tokenize(batch.texts).to(device)), dim=-1)
            keys += batch.keys
            images.append(image.half().cpu().numpy())
            texts.append(text.half().cpu().numpy())
            summary["skipped"].update(batch.skipped)
        dim = int(images[0].shape[1]) if images else 0
        meta = CacheMeta(fingerprint, model_name, scale, bias, dim, size)
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
