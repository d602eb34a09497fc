"""Writing image-text pairs as webdataset tar shards in img2dataset layout (KEY.png, KEY.txt, KEY.json)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

__all__ = ["Pair", "png_bytes", "shard_name", "write_shard"]


@dataclass(frozen=True)
class Pair:
    """One image-text pair to write. ``key`` must be unique within a dataset and contain no dots."""

    key: str
    image_png: bytes
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG (RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def write_shard(path: Path, pairs: Iterable[Pair]) -> int:
    """Write ``pairs`` to the tar ``path`` atomically (temp file, then rename); return how many were written.

    A crash leaves at most a ``.tmp`` file behind, never a truncated shard under the final name, so a
    builder can treat an existing shard as finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, mtime=0.0) as writer:
            for pair in pairs:
                if "." in pair.key or "/" in pair.key:
                    raise ValueError(f"sample key {pair.key!r} must not contain '.' or '/'")
                writer.write(
                    {
                        "__key__": pair.key,
                        "png": pair.image_png,
                        "txt": pair.text,
                        "json": json.dumps(pair.meta, ensure_ascii=False, sort_keys=True).encode(),
                    }
                )
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return count
