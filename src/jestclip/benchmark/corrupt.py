"""A noise dial: derive a pool in which a seeded share of the pairs carry another pair's caption.

``corrupt_captions(src, out, swap_captions=p, seed=s)`` reads the shard directory ``src`` (a ``pool`` from
``jestclip data build``, or any directory of webdataset ``.tar`` shards: a user's own, to check a reference
on them, docs/reference.md) and writes ``out``
with the same shard names, the same samples in the same order under the same keys and the same image
bytes. ``k = floor(p * N + 0.5)`` of the ``N`` pairs (round half up) are drawn without replacement from
``random.Random(seed)``; each drawn pair takes the caption of the next drawn pair in the draw order, the
last the first's (a cycle: no pair keeps its own caption), and draws whose new caption has the same text as
their own are exchanged with others until none has (so no pair keeps its own caption as text either).

A swapped pair's ``quality`` entry (``jestclip.data.quality``): ``clean`` false, ``clean_caption`` the image's
own, ``noise`` = ``swapped`` + the image-borne kinds the pair had (``near_blank``, ``skin_tone_repeat``,
``alias_repeat``) + the caption-borne kinds (``CAPTION_KINDS``) its new caption had at its donor: the kinds
describing a text travel with it. The JSON also names the donor (``caption_of``: its key). Unswapped
samples are copied byte for byte. In an unlabelled source a swapped pair gets
``{"clean": false, "clean_caption": null, "noise": ["swapped"]}`` and the others stay unlabelled.

``out`` is its own shard directory (a reference cache written beside it is its own); its ``manifest.json``
records the source directory, the SHA-256 of the source's ``manifest.json`` (of its shards' names and sizes
when it has none: ``source_shards_sha256``), ``swap_captions``, ``seed``,
the counts and the composition, and says ``complete`` once every shard is written. Writes are atomic and
resumable as the builder's: a shard with its ``.json`` sidecar is finished and kept; rerunning with the same
arguments finishes the rest and writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from jestclip.data.files import atomic_json
from jestclip.data.loader import shard_files
from jestclip.data.progress import progress
from jestclip.data.quality import CAPTION_KINDS, QUALITY_KEY, SWAPPED, merge_tallies, quality_entry, tally
from jestclip.data.swaps import swap_plan

__all__ = ["CORRUPT_FORMAT", "corrupt_captions", "swap_plan"]

CORRUPT_FORMAT = 1  # the layout of what ``corrupt_captions`` writes (a directory in another is not resumed)


def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of every sample of a tar shard, in order (members grouped by key)."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, ext = base_plus_ext(member.name)
                if base is None:
                    continue
                if base != key and key is not None:
                    yield key, members
                    members = {}
                key = base
                members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exn:
        raise ValueError(f"{shard}: not a readable tar shard ({exn})") from exn
    if key is not None:
        yield key, members


def _meta(key: str, members: dict[str, bytes], shard: Path) -> dict[str, Any]:
    if "txt" not in members:
        raise ValueError(f"{shard}: sample {key!r} has no caption (txt member)")
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
    except ValueError as exn:
        raise ValueError(f"{shard}: sample {key!r} has a bad json member ({exn})") from exn
    if not isinstance(meta, dict):
        raise ValueError(f"{shard}: sample {key!r}: its json member is not an object")
    return meta


def _swapped_meta(own: dict[str, Any], donor: dict[str, Any], donor_key: str) -> dict[str, Any]:
    mine, theirs = own.get(QUALITY_KEY) or {}, donor.get(QUALITY_KEY) or {}
    image_kinds = [k for k in mine.get("noise", []) if k not in CAPTION_KINDS and k != SWAPPED]
    caption_kinds = [k for k in theirs.get("noise", []) if k in CAPTION_KINDS]
    quality = quality_entry(mine.get("clean_caption"), [SWAPPED, *image_kinds, *caption_kinds])
    return {**own, QUALITY_KEY: quality, "caption_of": donor_key}


def _write(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a tar shard atomically (temp file, fsync, rename), members as given; mtime 0 (deterministic)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, mtime=0.0) as writer:
            for key, members in samples:
                writer.write({"__key__": key, **members})
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def corrupt_captions(src: Path, out: Path, swap_captions: float, seed: int = 0) -> dict[str, Any]:
    """Write ``out``, ``src`` with a seeded share ``swap_captions`` of its captions swapped; return (and
    write) ``out/manifest.json``. See the module docstring for what is written.

    Raises ValueError (one line, naming the path or value) when ``swap_captions`` is outside [0, 1], ``src``
    is not a directory of ``.tar`` shards, a source shard is unreadable or has a
    sample without a caption, a key repeats, ``out`` is ``src``, or ``out`` exists holding anything but a
    corrupt output of the same arguments.
    """
    src, out = Path(src), Path(out)
    shards, config = _start(src, out, swap_captions, seed)
    keys, texts, metas, bounds = _read_pool(src, shards)  # pass 1: the swaps are drawn over the whole pool
    donor = swap_plan(texts, swap_captions, seed)
    results = []  # pass 2: each unfinished shard, its sidecar after it
    bar = progress(total=len(keys), desc="write", unit="pair")
    for s, shard in enumerate(shards):
        sidecar = (out / shard.name).with_suffix(".json")
        if (out / shard.name).exists() and sidecar.exists():
            results.append(json.loads(sidecar.read_text(encoding="utf-8")))
        else:
            results.append(
                _write_swapped(shard, out, range(bounds[s], bounds[s + 1]), donor, keys, texts, metas)
            )
        bar.update(bounds[s + 1] - bounds[s])
    bar.close()
    has_manifest = (src / "manifest.json").is_file()
    source = json.loads((src / "manifest.json").read_bytes()) if has_manifest else {}
    composition = merge_tallies(r["composition"] for r in results)
    manifest = {
        "part": source.get("part"),
        "count": sum(r["count"] for r in results),
        "shards": [r["shard"] for r in results],
        "by_source": {g: c["pairs"] for g, c in composition.items() if g != "all"},
        "skipped": {},
        "image_size": source.get("image_size"),
        "composition": composition,
        "corrupt": {**config, "pairs": len(keys), "swapped": sum(r["swapped"] for r in results)},
        "complete": True,
    }
    atomic_json(out / "manifest.json", manifest)
    return manifest


def _start(src: Path, out: Path, swap_captions: float, seed: int) -> tuple[list[Path], dict[str, Any]]:
    """The source shards and the run's config, after checking the arguments and what ``out`` holds; marks
    ``out/manifest.json`` incomplete (see ``corrupt_captions`` for the errors)."""
    if not 0.0 <= swap_captions <= 1.0:
        raise ValueError(f"swap_captions must be in [0, 1], got {swap_captions}")
    found = [Path(url) for url in shard_files(src)] if src.is_dir() else []
    shards = [shard for shard in found if shard.name.endswith(".tar")]
    if len(shards) < len(found):  # it rewrites each shard as an uncompressed tar of the same name
        others = [shard.name for shard in found if not shard.name.endswith(".tar")]
        raise ValueError(
            f"{src} holds {len(others)} compressed shard(s) ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}) that jestclip data corrupt would leave out: it reads "
            "and writes uncompressed .tar shards; decompress them first"
        )
    if not shards:
        raise ValueError(f"{src} is not a shard directory (no .tar shards in it)")
    if out.resolve() == src.resolve():
        raise ValueError(f"the output {out} is the source directory; choose a new one")
    manifest = src / "manifest.json"
    config: dict[str, Any] = {
        "format": CORRUPT_FORMAT,
        "source": str(src.resolve()),
        "source_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
        if manifest.is_file()
        else None,
        "swap_captions": swap_captions,
        "seed": seed,
    }
    if not manifest.is_file():  # a user's own shards: their names and sizes identify them
        listing = "".join(f"{shard.name}\t{shard.stat().st_size}\n" for shard in shards)
        config["source_shards_sha256"] = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    record = out / "manifest.json"
    if record.exists():
        old = json.loads(record.read_text(encoding="utf-8")).get("corrupt")
        if not isinstance(old, dict):
            raise ValueError(f"{out} holds shards not written by jestclip data corrupt; use a new directory")
        changed = sorted(k for k in config if old.get(k) != config[k])
        if changed:
            changes = ", ".join(changed)
            raise ValueError(f"{out} was written with another config ({changes}); use a new directory")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not the output of jestclip data corrupt; use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(record, {"corrupt": config, "complete": False})
    return shards, config


def _read_pool(src: Path, shards: list[Path]) -> tuple[list[str], list[str], list[dict[str, Any]], list[int]]:
    """Every sample's key, caption and JSON in shard order, and where each shard's samples start (a
    ValueError names a key that repeats)."""
    keys: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    bounds = [0]
    for shard in progress(shards, desc="read", unit="shard"):
        for key, members in _samples(shard):
            metas.append(_meta(key, members, shard))
            keys.append(key)
            texts.append(members["txt"].decode("utf-8", errors="replace"))
        bounds.append(len(keys))
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        repeated = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"{src}: key {repeated!r} appears more than once; keys must be unique")
    return keys, texts, metas, bounds


def _write_swapped(
    shard: Path,
    out: Path,
    rows: range,
    donor: dict[int, int],
    keys: list[str],
    texts: list[str],
    metas: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write ``shard`` into ``out`` with the captions of its ``rows`` (pool indices) that ``donor`` swaps
    taken from their donors, then its sidecar; the sidecar's stats."""
    written, shard_metas, swapped = [], [], 0
    for i, (key, members) in zip(rows, _samples(shard), strict=True):
        meta = metas[i]
        if i in donor:
            j = donor[i]
            meta = _swapped_meta(metas[i], metas[j], keys[j])
            json_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
            members = {**members, "txt": texts[j].encode("utf-8"), "json": json_bytes}
            swapped += 1
        written.append((key, members))
        shard_metas.append(meta)
    path = out / shard.name
    _write(path, written)
    stats = {"shard": path.name, "count": len(written), "swapped": swapped, "composition": tally(shard_metas)}
    atomic_json(path.with_suffix(".json"), stats)
    return stats
