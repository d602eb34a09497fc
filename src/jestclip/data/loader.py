"""A keyed, robust webdataset stream of image-text pairs, grouped into super-batches.

Works on any img2dataset-style shards (``KEY.{png,jpg,jpeg,webp}``, ``KEY.txt``, optional ``KEY.json``):
local paths, brace patterns (``data/{00000..00041}.tar``) or a directory of ``.tar`` files. Every sample keeps
its ``__key__`` and shard URL end to end, so reference embeddings can be joined by key later.

Splitting: shards are dealt to ranks (``shards[rank::world_size]``) and then to DataLoader workers; with
``resampled=True`` every (rank, worker) instead draws shards at random forever, from its own seed.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor
from webdataset.shardlists import expand_urls as expand_pattern

__all__ = ["IMAGE_EXTENSIONS", "Sample", "SuperBatch", "SuperBatchStream", "decode_sample", "expand_urls"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class Sample:
    """One decoded pair: ``image`` is an RGB PIL image, or whatever the stream's transform made of it."""

    key: str
    url: str
    image: Any
    text: str
    meta: dict[str, Any]


@dataclass
class SuperBatch:
    """B decoded pairs in stream order.

    images: ``[B, 3, H, W]`` (stacked output of the transform); keys, urls, texts, meta: B entries each.
    skipped: samples this worker skipped since its previous super-batch, by reason.
    """

    keys: list[str]
    urls: list[str]
    images: Tensor
    texts: list[str]
    meta: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from brace patterns (``::``-separated), directories of ``.tar`` files, or a list."""
    if isinstance(urls, str | Path):
        urls = [urls]
    out: list[str] = []
    for item in urls:
        item = str(item)
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise ValueError(f"no .tar shards in directory {item}")
            out.extend(found)
        else:
            out.extend(expand_pattern(item))
    if not out:
        raise ValueError("no shard URLs given")
    return out


def decode_sample(raw: dict[str, Any]) -> Sample | str:
    """Decode one raw webdataset sample; return a Sample, or the reason (a short string) it was skipped."""
    key, url = raw.get("__key__"), raw.get("__url__", "")
    if not key:
        return "missing_key"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return "missing_image"
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "bad_image"
    if "txt" not in raw:
        return "missing_text"
    try:
        text = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_text"
    if not text:
        return "empty_text"
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "bad_json"
        if not isinstance(meta, dict):
            return "bad_json"
    return Sample(key=key, url=url, image=image, text=text, meta=meta)


def _to_tensor(image: Image.Image) -> Tensor:
    return pil_to_tensor(image).float().div_(255.0)


class SuperBatchStream(IterableDataset):
    """Iterable of ``SuperBatch``es of ``batch_size`` pairs; use with ``DataLoader(batch_size=None)``.

    epochs: passes over this rank's shards (None = forever); ignored when ``resampled``.
    transform: PIL image -> ``[3, H, W]`` tensor (default: float in [0, 1]; sizes must then agree).
    shuffle_buffer: shuffle samples within a buffer of this many (0 = keep shard order).
    rank, world_size: default to torch.distributed's when it is initialised, else 0 and 1.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        *,
        batch_size: int,
        transform: Callable[[Image.Image], Tensor] | None = None,
        epochs: int | None = 1,
        resampled: bool = False,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = expand_urls(urls)
        self.batch_size = batch_size
        self.transform = transform or _to_tensor
        self.epochs = epochs
        self.resampled = resampled
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.seed = seed
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not resampled and len(self.urls) < world_size:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {world_size} ranks; use more shards or "
                "resampled=True"
            )
        self.rank, self.world_size = rank, world_size

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard_order(self) -> Iterator[str]:
        worker, n_workers = self._worker()
        if self.resampled:
            rng = random.Random(f"{self.seed}/{self.rank}/{worker}")
            while True:
                yield rng.choice(self.urls)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            urls = list(self.urls)
            if self.shuffle_shards:
                random.Random(f"{self.seed}/epoch{epoch}").shuffle(urls)
            yield from urls[self.rank :: self.world_size][worker::n_workers]
            epoch += 1

    def samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, transformed; skips are counted into ``skipped``."""
        skipped = Counter() if skipped is None else skipped

        def on_tar_error(exn: Exception) -> bool:
            skipped["bad_shard"] += 1
            return True

        to_samples = wds.tarfile_to_samples(handler=on_tar_error)
        raw_samples = to_samples({"url": u} for u in self._shard_order())
        stream = (self._decode(raw, skipped) for raw in raw_samples)
        decoded = (s for s in stream if s is not None)
        if self.shuffle_buffer > 1:
            worker, _ = self._worker()
            decoded = _shuffled(
                decoded, self.shuffle_buffer, random.Random(f"{self.seed}/{self.rank}/{worker}/s")
            )
        yield from decoded

    def _decode(self, raw: dict[str, Any], skipped: Counter[str]) -> Sample | None:
        sample = decode_sample(raw)
        if isinstance(sample, str):
            skipped[sample] += 1
            return None
        try:
            image = self.transform(sample.image)
        except Exception as exn:  # a user transform failing on one image must not end the stream
            skipped[f"transform_failed:{type(exn).__name__}"] += 1
            return None
        return Sample(sample.key, sample.url, image, sample.text, sample.meta)

    def __iter__(self) -> Iterator[SuperBatch]:
        skipped: Counter[str] = Counter()
        buffer: list[Sample] = []
        for sample in self.samples(skipped):
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield _collate(buffer, skipped)
                buffer, skipped = [], Counter()
        if buffer and not self.drop_last:
            yield _collate(buffer, skipped)


def _shuffled(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _collate(samples: list[Sample], skipped: Counter[str]) -> SuperBatch:
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) > 1:
        first = samples[0]
        odd = next(s for s in samples if tuple(s.image.shape) != tuple(first.image.shape))
        raise ValueError(
            f"images differ in size within a batch ({tuple(first.image.shape)} for key {first.key!r}, "
            f"{tuple(odd.image.shape)} for key {odd.key!r} in {odd.url}); pass a transform that resizes"
        )
    return SuperBatch(
        keys=[s.key for s in samples],
        urls=[s.url for s in samples],
        images=torch.stack([s.image for s in samples]),
        texts=[s.text for s in samples],
        meta=[s.meta for s in samples],
        skipped=dict(skipped),
    )
