"""A keyed, robust webdataset stream of image-text pairs, grouped into super-batches.

Works on any img2dataset-style shards (``KEY.{png,jpg,jpeg,webp}``, ``KEY.txt``, optional ``KEY.json``):
local paths, brace patterns (``data/{00000..00041}.tar``) or a directory of shards in any form the loader
reads (``SHARD_SUFFIXES``: ``.tar`` and gzip, bzip2 or xz compressed tars; ``shard_files``). Every sample
keeps its ``__key__`` and shard URL end to end, so reference embeddings can be joined by key later.

Splitting: the shard list (shuffled once by ``seed``) is dealt to ranks (``shards[rank::world_size]``) and
then to DataLoader workers, and each (rank, worker) keeps its own shards for the whole run: every epoch reads
them in a new order (seeded by seed, rank, worker and epoch); ``resampled=True`` repeats epochs forever.
So no two ranks or workers ever read the same shard, in any step, and a worker reads each of its samples once
per epoch. A super-batch never holds the same (shard, key) twice: a sample already in the super-batch being
filled (possible only where one epoch ends and the next begins) is skipped as ``repeat_in_batch``; a worker
whose shards hold fewer distinct samples than a super-batch raises ``TooFewSamplesError``. A shard listed
twice is read once (``duplicate_shard``): a local shard is its file, not its spelling (``distinct_shards``:
a symlink to it, a hard link or ``dir/./00000.tar`` is the same shard).

Bad data never ends the stream; it is skipped and counted. ``SuperBatch.skipped`` holds the skips this worker
made since its previous super-batch (a finite pass's trailing skips go with its last batch), so the sum over
all batches is every skip, by reason (with ``drop_last``, skips read with the dropped samples are dropped too;
``samples(skipped)`` counts without batches):

=======================  ====================================================================================
reason                   what was skipped
=======================  ====================================================================================
``bad_shard``            a shard that could not be opened or is not a tar archive (missing, unreadable, junk)
``truncated_shard``      a shard that ends early (cut mid-member, no end-of-archive marker, a corrupt header);
                         its members after the cut are lost, uncounted, and the rest of the stream goes on
``truncated_sample``     the sample being read when its shard ended early
``duplicate_shard``      a shard listed again, under any name (read once; counted by rank 0, worker 0)
``duplicate_key``        a sample whose key already appeared earlier in the same shard (the first one is kept)
``repeat_in_batch``      a sample already in the super-batch being filled (an epoch ended inside it), left out
``dotted_key``           a pair whose key holds a dot (``img_v1.3.jpg`` + ``img_v1.3.txt``): webdataset's key
                         is the name up to the first dot, so such pairs merge into one sample (key ``img_v1``,
                         members ``3.jpg``, ``3.txt``) that has no ``jpg``; each such pair counts once
``missing_key``          a sample without a key
``missing_image``        no ``png``/``jpg``/``jpeg``/``webp`` member
``bad_image``            image bytes that do not decode (or decode to a format outside ``IMAGE_FORMATS``)
``unsupported_image_mode`` pixels of a kind no web format holds (float ``F``, ``LAB``, ...); see ``to_rgb``
``image_too_large``      an image over ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb or a mistake)
``aspect_ratio_too_large`` an image whose longer side is over ``MAX_ASPECT_RATIO`` times its shorter one (a
                         1 x 8000 line): resizing its shorter side to the model's input would make it huge
``missing_text``         no ``txt`` member
``bad_text``             a ``txt`` member that is not UTF-8
``empty_text``           a caption that is empty once cleaned as open_clip's tokenizers clean it
                         (``caption_is_empty``: ``&nbsp;``, ``&amp;nbsp;``, a byte-order mark, NUL bytes)
``bad_json``             a ``json`` member that is not a JSON object
``transform_failed:E``   the stream's transform raised exception ``E`` on the image
``not_kept``             a sample the stream's ``keep`` predicate (a filter's keep list) does not keep;
                         skipped before it is decoded
=======================  ====================================================================================

A shard that yields no sample at all is warned about once per stream (per worker). A stream that could loop
forever (``resampled`` or ``epochs=None``) raises ``NoReadableSampleError`` once it has opened every shard it
can draw in a row without one readable sample, instead of spinning at 100% CPU; ``require_samples=True`` asks
the same of a finite pass (and also that the pass yields something). ``expand_urls`` rejects local paths and
patterns naming files that do not exist before any stream starts.

Resuming: every super-batch carries its worker's ``position`` after it (where that worker's next batch starts:
the epoch, the index in that epoch's shard order, the shard and how many of its raw samples were consumed).
``ResumableBatches`` runs a stream through DataLoader workers and records these as batches are consumed;
started from a recorded position it re-reads only the tar members of the current shard up to the offset (none
decoded, their skips already counted) and continues exactly as the uninterrupted stream would, skips included.
A stream with a shuffle buffer records no position (the buffer's contents are not recorded) and refuses to
resume at one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageCms,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as expand_pattern
from webdataset.tariterators import base_plus_ext

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "SHARD_REASONS",
    "SHARD_SUFFIXES",
    "NoReadableSampleError",
    "ResumableBatches",
    "Sample",
    "SuperBatch",
    "SuperBatchStream",
    "TooFewSamplesError",
    "caption_is_empty",
    "content_digest",
    "dead_loader_worker",
    "decode_sample",
    "distinct_shards",
    "dotted_pairs",
    "expand_urls",
    "file_identity",
    "open_image",
    "read_shard",
    "shard_files",
    "to_rgb",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# What PIL may decode image members as: web formats only, so junk bytes never reach e.g. the EPS plugin
# (which runs Ghostscript) or the rarely used, often vulnerable ones.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG includes MPO (multi-picture JPEG)
_PLUGINS = (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)  # registered
# The largest image decoded, in pixels: 8192 x 8192 ~ 67 Mpx (~200 MB as RGB). Web image-text pairs are at
# most a few Mpx and training resizes to a few hundred pixels, so anything larger is a decompression bomb or
# a mistake and is skipped as ``image_too_large``. Checked from the header, before any pixel is decoded;
# PIL's own process-wide Image.MAX_IMAGE_PIXELS is left alone.
MAX_IMAGE_PIXELS = 8192 * 8192
# The largest ratio of an image's longer side to its shorter one that is decoded (img2dataset's
# ``max_aspect_ratio``). What an image costs is what the transform makes of it, not only the pixels decoded:
# open_clip's transforms resize the shorter side to the input size S before cropping, so an image of aspect
# ratio A becomes A * S^2 pixels: a 1 x 8000 PNG of 100 bytes became 224 x 1,792,000 (+1.6 GB, 6 s).
# At most 20 keeps that under 1.1 Mpx at S = 224 (and 21 Mpx at S = 1024), while banners (728 x 90 is 8.1)
# and panoramas pass. Checked from the header, with MAX_IMAGE_PIXELS: together they bound every image's work.
MAX_ASPECT_RATIO = 20
# The shard forms the loader reads (tarfile's "r|*": plain, gzip, bzip2, xz; zstd where Python has it), by
# file name: what a directory of shards yields.
_COMPRESSED = {
    "gz": (".tar.gz", ".tgz"),
    "bz2": (".tar.bz2", ".tbz2", ".tbz"),
    "xz": (".tar.xz", ".txz"),
    "zst": (".tar.zst", ".tzst"),
}
_READABLE = [
    suffix for method, forms in _COMPRESSED.items() if method in tarfile.TarFile.OPEN_METH for suffix in forms
]
SHARD_SUFFIXES = (".tar", *_READABLE)
# tar forms it cannot read: a directory holding one is refused by name rather than read in part
_UNREADABLE_SUFFIXES = (
    ".tar.zst",
    ".tzst",
    ".tar.lz4",
    ".tar.lz",
    ".tar.lzo",
    ".tar.br",
    ".tar.z",
    ".tar.7z",
)
# Shard-level skip reasons; every other reason counts one sample.
SHARD_REASONS = ("bad_shard", "truncated_shard", "duplicate_shard")

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http://, s3://, file:: not checked up front


class NoReadableSampleError(ValueError):
    """A stream went through every shard it can draw without finding one readable sample (bad input data).

    Re-raised in the main process from a DataLoader worker, torch passes its "Caught ... in DataLoader worker
    process N. Original Traceback ..." text as the message; only the original message is kept, so the error
    stays one line naming the shards.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# torch's words when a DataLoader worker process dies (the out-of-memory killer's SIGKILL, a bus error on
# shared memory, any signal or exit): from the iterator, or from its SIGCHLD handler at any line of the main
# process
_DEAD_WORKER = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\) "
    r"(?:is killed by signal: (?P<signal>[^.]*)|exited unexpectedly(?: with exit code (?P<code>-?\d+))?)"
)


def dead_loader_worker(exn: BaseException) -> str | None:
    """What happened when ``exn`` is torch's error for a DataLoader worker that died, else None:
    ``a data loader worker (pid 8398) was killed by signal: Killed (SIGKILL: often the out-of-memory
    killer)``. The worker's data is lost, not bad: a rerun resumes from the last checkpoint."""
    found = _DEAD_WORKER.search(str(exn)) if isinstance(exn, RuntimeError) else None
    if found is None:
        return None
    pids = found["pids"].strip()
    who = f"data loader workers (pids {pids})" if "," in pids else f"a data loader worker (pid {pids})"
    if found["signal"] is not None:
        what = found["signal"].strip()
        oom = " (SIGKILL: often the out-of-memory killer)" if what == "Killed" else ""
        return f"{who} was killed by signal: {what}{oom}"
    code = f" with exit code {found['code']}" if found["code"] is not None else ""
    return f"{who} exited unexpectedly{code}"


class TooFewSamplesError(NoReadableSampleError):
    """A worker's shards hold fewer distinct samples than one super-batch: it cannot be filled without
    repeating a sample (bad input for the batch size)."""


@dataclass(frozen=True)
class Sample:
    """One decoded pair: ``image`` is an RGB PIL image, or whatever the stream's transform made of it;
    ``digest``: the ``content_digest`` of the image and caption bytes it was decoded from."""

    key: str
    url: str
    image: Any
    text: str
    meta: dict[str, Any]
    digest: int = 0


@dataclass
class SuperBatch:
    """B decoded pairs in stream order.

    images: ``[B, 3, H, W]`` (stacked output of the transform); keys, urls, texts, meta: B entries each.
    skipped: samples (and shards) this worker skipped since its previous super-batch, by reason (see the
    module docstring); summed over all batches it is every skip.
    digests: B ``content_digest``s of the image and caption bytes (the reference cache checks them).
    position: where the worker that made this batch stands after it (``worker``: its index; ``end``: it has
    nothing more; else ``url`` and ``sample``, the shard it reads and how many of its raw samples it consumed,
    and ``epoch`` and ``shard``, its place in its shard order); None for a stream with a shuffle buffer.
    """

    keys: list[str]
    urls: list[str]
    images: Tensor
    texts: list[str]
    meta: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)
    position: dict[str, Any] | None = None
    digests: list[int] = field(default_factory=list)  # B ``content_digest``s, checked by the reference cache

    def __len__(self) -> int:
        return len(self.keys)


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from brace patterns (``::``-separated), directories of shards (``shard_files``), or a list.

    Local paths must exist: a missing file, or a pattern naming missing files, is a ValueError naming it.
    """
    if isinstance(urls, str | Path):
        urls = [urls]
    out: list[str] = []
    for item in urls:
        out.extend(_expand_one(str(item)))
    if not out:
        raise ValueError("no shard URLs given")
    return out


def distinct_shards(urls: Sequence[str]) -> tuple[list[str], int]:
    """``urls`` with every shard once, by the first name it is listed under, and how many other names were
    dropped. A local shard is its file (device and inode): a symlink in the pool directory, a hard link,
    ``dir/./00000.tar`` beside ``dir/00000.tar`` all name one shard, which would otherwise be read twice an
    epoch, put the same pairs on two ranks in one step and twice in a super-batch, and be cached twice. A
    URL (``pipe:``, ``http://``) is its text."""
    seen: set[Any] = set()
    distinct = []
    for url in urls:
        identity = file_identity(url)
        if identity not in seen:
            seen.add(identity)
            distinct.append(url)
    return distinct, len(urls) - len(distinct)


def file_identity(url: str | Path) -> Any:
    """What tells shards apart: ``(device, inode)`` of a local file, else the URL (or a path that does not
    exist) as text."""
    url = str(url)
    if not _URL_SCHEME.match(url):
        with suppress(OSError):
            info = os.stat(url)
            return (info.st_dev, info.st_ino)
    return url


def shard_files(directory: str | Path) -> list[str]:
    """Every shard in ``directory``, in name order: each file named ``*.tar`` or a compressed tar the loader
    reads (``SHARD_SUFFIXES``). A directory that also holds tars in a form it cannot read (``.tar.zst``
    before Python 3.14, ``.tar.lz4``, ...) is a ValueError naming them: reading only the others would leave
    part of the pool out without a word. Other files (sidecars, manifests) are not shards."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    unreadable = [p.name for p in files if p.name.lower().endswith(_UNREADABLE_SUFFIXES)]
    unreadable = [name for name in unreadable if not name.lower().endswith(SHARD_SUFFIXES)]
    if unreadable:
        first = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        raise ValueError(
            f"directory {directory} holds {len(unreadable)} shard(s) in a form the loader cannot read "
            f"({first}); it reads {', '.join(SHARD_SUFFIXES)}: convert them, or name the shards to read"
        )
    return [str(p) for p in files if p.name.lower().endswith(SHARD_SUFFIXES)]


def _expand_one(item: str) -> list[str]:
    if Path(item).is_dir():
        found = shard_files(item)
        if not found:
            raise ValueError(f"no shards ({', '.join(SHARD_SUFFIXES)}) in directory {item}")
        return found
    found = list(expand_pattern(item))
    missing = [u for u in found if not _URL_SCHEME.match(u) and not Path(u).is_file()]
    if missing and found == [item]:
        raise ValueError(f"shard {item!r} does not exist")
    if missing:
        first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"shard pattern {item!r}: {len(missing)} of {len(found)} files missing ({first})")
    return found


def decode_sample(raw: dict[str, Any], *, decode_size: int | None = None) -> Sample | str:
    """Decode one raw webdataset sample; return a Sample, or the reason (a short string) it was skipped.

    decode_size: see ``open_image``.
    """
    key, url = raw.get("__key__"), raw.get("__url__", "")
    if not key:
        return "missing_key"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return "missing_image"
    image = open_image(raw[ext], decode_size=decode_size)
    if isinstance(image, str):
        return image
    if "txt" not in raw:
        return "missing_text"
    try:
        text = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_text"
    if caption_is_empty(text):
        return "empty_text"
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
            return "bad_json"
        if not isinstance(meta, dict):
            return "bad_json"
    return Sample(key=key, url=url, image=image, text=text, meta=meta, digest=content_digest(raw))


def caption_is_empty(text: str) -> bool:
    """Whether ``text`` holds nothing once cleaned as open_clip's tokenizers clean every caption first
    (``basic_clean``: ftfy, HTML entities unescaped twice; then ``whitespace_clean``): the functions
    themselves, not a copy. ``&nbsp;``, ``&amp;nbsp;``, a lone byte-order mark or NUL bytes clean to nothing
    and tokenise to ``[SOT, EOT]``: every such pair would be trained on the same empty text, each a false
    negative of the others in its batch. (SigLIP's ``canonicalize`` cleaning also drops punctuation; a
    caption of punctuation only is empty for that tokenizer alone and is kept.)"""
    basic_clean, whitespace_clean = _open_clip_cleaning()
    return not whitespace_clean(basic_clean(text))


@functools.cache
def _open_clip_cleaning() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """open_clip's ``basic_clean`` and ``whitespace_clean``, imported on first use (open_clip takes ~1.5 s
    to import; commands that read no caption need not pay it)."""
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return basic_clean, whitespace_clean


def content_digest(raw: dict[str, Any]) -> int:
    """A 64-bit digest (BLAKE2b) of what a sample's embedding depends on: the bytes of the image member the
    loader decodes (the first of ``IMAGE_EXTENSIONS`` present) and of its caption (``txt``). Metadata
    (``json``) is left out. Two samples differ in image or caption bytes, except with probability 2^-64, iff
    their digests differ. Costs about 1 µs per KB (a 30 KB sample: ~30 µs against milliseconds to decode)."""
    h = hashlib.blake2b(digest_size=8)
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    for name in (ext, "txt"):
        data = raw.get(name) if name is not None else None
        h.update(b"-" if data is None else b"%d:" % len(data) + data)
    return int.from_bytes(h.digest(), "little")


def dotted_pairs(raw: dict[str, Any]) -> int:
    """How many image-text pairs with a dotted key webdataset's grouping merged into ``raw``: members
    ``MIDDLE.EXT`` (``img_v1.3.jpg`` is key ``img_v1``, member ``3.jpg``) with EXT an image extension or
    ``txt``, counted by distinct MIDDLE."""
    wanted = (*IMAGE_EXTENSIONS, "txt")
    return len({name.rpartition(".")[0] for name in raw if "." in name and name.rpartition(".")[2] in wanted})


def open_image(data: bytes, *, decode_size: int | None = None) -> Image.Image | str:
    """The image in ``data`` as an 8-bit sRGB ``RGB`` image, as an image viewer shows it (``to_rgb``), or the
    reason it is skipped: ``bad_image`` / ``image_too_large`` / ``aspect_ratio_too_large`` /
    ``unsupported_image_mode``. Size and aspect ratio are read from the header, before any pixel is decoded.

    decode_size: decode a JPEG at the smallest scale libjpeg offers (1/2, 1/4 or 1/8, PIL's draft mode) whose
    width and height both stay >= ``decode_size`` — enough for a transform that resizes the shorter side to
    ``decode_size`` — and skip most of the decoding and resizing work. Other formats, and JPEGs smaller than
    twice ``decode_size``, decode in full. None: always in full.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return "image_too_large"
            if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
                return "aspect_ratio_too_large"
            if decode_size is not None and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (decode_size, decode_size))
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError:
        return "image_too_large"
    except Exception:  # a third-party decoder on untrusted bytes: any failure means a bad image
        return "bad_image"


def to_rgb(image: Image.Image) -> Image.Image | str:
    """A decoded image as an image viewer displays it on a white page, as 8-bit sRGB ``RGB``; or
    ``unsupported_image_mode`` for a pixel format no web format delivers (``F``, ``LAB``, ``HSV``, ...).

    What each form a web crawl delivers becomes (``docs/reliability.md``, "Reliability II — data", lists
    them with their tests):

    - EXIF orientation: the image is rotated / mirrored upright, in place (``ImageOps.exif_transpose``).
    - 16-bit gray (``I;16``, ``I;16B``, ``I;16L``, ``I``: PNG bit depth 16): scaled to 8 bits,
      ``round(v * 255 / 65535)``; PIL's own conversion clips at 255 and makes them almost white. 16-bit RGB
      PNGs PIL already reads as 8-bit ``RGB`` (the high byte of each sample).
    - an embedded ICC profile (Adobe RGB, Display P3, a CMYK press profile, a gray gamma): the colours are
      converted to sRGB with it (``PIL.ImageCms``, perceptual intent); an unreadable profile is ignored, as
      viewers do (the pixels are taken as sRGB).
    - CMYK JPEGs (Adobe-inverted ones and YCCK, which libjpeg turns into CMYK): PIL's CMYK to RGB
      conversion, or the ICC profile when there is one.
    - transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a ``tRNS`` colour): composited over
      white, ``out = a * colour + (1 - a) * 255``, as a browser shows it on a white page. Dropping the alpha
      channel would show whatever colour the transparent pixels happen to store (often black).
    - palette (``P``), 1-bit, ``L``: expanded to RGB.
    - animated GIF / WebP / APNG and MPO: the first frame (what PIL opens and what a static viewer shows).
    """
    ImageOps.exif_transpose(image, in_place=True)  # (no copy when upright)
    profile = image.info.get("icc_profile")
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    alpha = None
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        image = image.convert("L" if image.mode in ("L", "LA", "La") else "RGB")
    elif image.mode not in _COLOUR:
        return "unsupported_image_mode"
    if image.mode not in ("RGB", "L", "CMYK"):  # 1-bit, palette, YCbCr
        image = image.convert("RGB")
    rgb = _to_srgb(image, profile) if profile else None
    rgb = rgb or image.convert("RGB")
    if alpha is not None and alpha.getextrema()[0] < 255:
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    return rgb


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_COLOUR = ("RGB", "L", "1", "P", "CMYK", "YCbCr")


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image | None:
    """``image`` (``RGB``, ``L`` or ``CMYK``) converted to sRGB with its embedded ICC ``profile``; None when
    the profile is sRGB already, unreadable or of another colour space than the pixels."""
    transform = _icc_transform(hashlib.blake2b(profile, digest_size=16).digest(), profile, image.mode)
    return None if transform is None else ImageCms.applyTransform(image, transform)


@functools.lru_cache(maxsize=64)
def _icc_transform(digest: bytes, profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The ICC transform from ``profile`` to sRGB for ``mode`` pixels, built once per profile (``digest``
    keys the cache; building one costs about a millisecond); None for an RGB profile that maps a probe of
    colours onto themselves (sRGB, whatever its name), so most web images skip the conversion."""
    del digest
    if mode not in ("RGB", "L", "CMYK"):
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        transform = ImageCms.buildTransform(source, _srgb(), mode, "RGB", ImageCms.Intent.PERCEPTUAL)
        if mode == "RGB":
            probe = Image.fromarray(_PROBE)
            moved = np.abs(np.asarray(ImageCms.applyTransform(probe, transform), np.int16) - _PROBE).max()
            if moved <= 1:
                return None
        return transform
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


# Every combination of 0, 64, 128, 192, 255 per channel (125 colours) as a 5 x 25 RGB image.
_PROBE = np.stack(np.meshgrid(*[[0, 64, 128, 192, 255]] * 3, indexing="ij"), -1).reshape(5, 25, 3)
_PROBE = _PROBE.astype(np.uint8)


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class _TarInfo(tarfile.TarInfo):
    """Records on the TarFile whether the archive ended with its end-of-archive marker (a zero block).

    Python's tarfile ends iteration silently on a missing or cut header after the first member; this is how
    a truncated shard is told from a complete one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar._jestclip_end_marker = True  # type: ignore[attr-defined]
            raise


class _Grouper:
    """Groups consecutive tar members by key into raw samples; a key seen before in the shard is a duplicate.

    A member whose extension the current sample already has starts a new sample (a duplicate of the key).
    """

    def __init__(self, url: str, count: Callable[[str], None]) -> None:
        self.url, self.count = url, count
        self.current: dict[str, Any] | None = None
        self.duplicate = False
        self.seen: set[str] = set()

    def add(self, key: str, ext: str, data: bytes) -> dict[str, Any] | None:
        """Add a member; return the sample it completed, if any (duplicates are counted, not returned)."""
        done = None
        if self.current is None or key != self.current["__key__"] or ext in self.current:
            done = self.finish()
            self.duplicate = key in self.seen
            self.seen.add(key)
            self.current = {"__key__": key, "__url__": self.url}
        self.current[ext] = data
        return done

    def finish(self) -> dict[str, Any] | None:
        """The sample being assembled (None if none, or if it duplicates an earlier key)."""
        done, self.current = self.current, None
        if done is not None and self.duplicate:
            self.count("duplicate_key")
            return None
        return done

    def abandon(self) -> None:
        """The shard ended early: the sample being assembled is lost."""
        if self.current is not None:
            self.count("truncated_sample")
        self.current = None


def read_shard(url: str, count: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, one bytes entry per extension) of one shard, in member order.

    Never raises on bad data: problems are passed to ``count`` as skip reasons (see the module docstring).
    """
    try:
        stream = gopen(url, "rb")
    except Exception:
        count("bad_shard")
        return
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
        except Exception:
            count("bad_shard")
            return
        yield from _tar_samples(tar, url, count)
    finally:
        with suppress(Exception):
            stream.close()


def _tar_samples(tar: tarfile.TarFile, url: str, count: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    group = _Grouper(url, count)
    try:
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            member = tar.extractfile(info)
            done = group.add(key, ext.lower(), member.read() if member is not None else b"")
            if done is not None:
                yield done
        complete = getattr(tar, "_jestclip_end_marker", False)
    except Exception:  # cut data, a corrupt header or compressed stream: the rest of the shard is lost
        complete = False
    if not complete:
        count("truncated_shard")
        group.abandon()
    done = group.finish()
    if done is not None:
        yield done


def _to_tensor(image: Image.Image) -> Tensor:
    return pil_to_tensor(image).float().div_(255.0)


class _Tally:
    """Counts skips into the stream's running counter and into the current shard's."""

    def __init__(self, total: Counter[str]) -> None:
        self.total = total
        self.shard: Counter[str] = Counter()

    def __call__(self, reason: str) -> None:
        self.total[reason] += 1
        self.shard[reason] += 1


class _ShardWatch:
    """Warns once per shard that yields nothing; raises when no shard of a whole pass yields anything.

    pool: every shard this worker can draw; ``required``: raise once all of them were opened in a row without
    a readable sample, or (``end``) when the stream ended having yielded nothing.
    """

    def __init__(self, pool: Sequence[str], required: bool, warned: set[str]) -> None:
        self.pool, self.required, self.warned = set(pool), required, warned
        self.run: dict[str, None] = {}  # shards opened since the last readable sample, in order
        self.run_skips: Counter[str] = Counter()
        self.yielded = 0

    def shard_done(self, url: str, good: int, skips: Counter[str]) -> None:
        if good:
            self.yielded += good
            self.run.clear()
            self.run_skips.clear()
            return
        if url not in self.warned:
            self.warned.add(url)
            warnings.warn(f"shard {url} has no readable sample ({_reasons(skips)})", RuntimeWarning, 2)
        self.run[url] = None
        self.run_skips.update(skips)
        if self.required and len(self.run) >= len(self.pool):
            raise NoReadableSampleError(self._message())

    def end(self) -> None:
        if self.required and self.run and not self.yielded:
            raise NoReadableSampleError(self._message())

    def _message(self) -> str:
        tried = list(self.run)
        names = ", ".join(tried[:5]) + (f" and {len(tried) - 5} more" if len(tried) > 5 else "")
        return f"no readable sample in {len(tried)} shards tried: {names} ({_reasons(self.run_skips)})"


def _reasons(skips: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(skips.items())) or "no samples"


class SuperBatchStream(IterableDataset):
    """Iterable of ``SuperBatch``es of ``batch_size`` pairs; use with ``DataLoader(batch_size=None)``.

    epochs: passes over this worker's shards (None = forever); ignored when ``resampled``.
    resampled: epochs forever, each in a new shard order (shuffled even with ``shuffle_shards=False``).
    transform: PIL image -> ``[3, H, W]`` tensor (default: float in [0, 1]; sizes must then agree).
    shuffle_buffer: shuffle samples within a buffer of this many (0 = keep shard order).
    decode_size: decode JPEGs at a reduced scale that still covers this many pixels on both sides (PIL's
    draft mode; see ``open_image``); set it to the transform's resize target. None: decode in full.
    rank, world_size: default to torch.distributed's when it is initialised, else 0 and 1.
    require_samples: raise ``NoReadableSampleError`` when every shard this worker can draw was opened in a
    row without a readable sample (and, for a finite pass, when it ended with none). Default: only for
    streams that would otherwise loop forever (``resampled`` or ``epochs=None``).
    keep: ``keep(url, key, digest=None) -> bool``, whether to read sample ``key`` of shard ``url``, given its
    ``content_digest`` (e.g. a ``data.keeplist.KeepList``, which raises for a kept sample whose bytes
    changed; ``digest`` None asks membership only, as the memory pool's size estimate does); the others are
    skipped as ``not_kept`` before decoding. None: read all.
    batch_sizes: ``batch_sizes(t)``, this rank's size of super-batch ``t`` (0-based, counted over the whole
    run and every loader worker: the DataLoader hands out its workers' batches round-robin, so worker ``w`` of
    ``n`` builds batches ``w, w + n, ...``), at most ``batch_size`` (a selection schedule's steps:
    ``train.schedule``). Picklable for loader workers. None: ``batch_size`` every time.
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
        require_samples: bool | None = None,
        decode_size: int | None = None,
        keep: Callable[..., bool] | None = None,
        batch_sizes: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decode_size is not None and decode_size < 1:
            raise ValueError(f"decode_size must be >= 1 or None, got {decode_size}")
        self.urls, self._duplicate_shards = distinct_shards(expand_urls(urls))  # each shard read once
        self.batch_size = batch_size
        self.transform = transform or _to_tensor
        self.epochs = epochs
        self.resampled = resampled
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.decode_size = decode_size
        self.keep = keep
        self.batch_sizes = batch_sizes
        self.drop_last = drop_last
        self.seed = seed
        self.require_samples = (resampled or epochs is None) if require_samples is None else require_samples
        self._warned: set[str] = set()  # shards already warned about as yielding nothing
        self._resume: dict[str, Any] | None = None  # set by ``resumed``: the recorded workers' positions
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(self.urls) < world_size:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {world_size} ranks (ranks read disjoint "
                "shards); use at least as many shards as ranks"
            )
        self.rank, self.world_size = rank, world_size

    def _worker(self) -> tuple[int, int]:
        """This worker's index and the number of workers; a resumed stream's DataLoader worker ``i`` continues
        the recorded worker ``(next + i) % n`` (the one whose batch came next)."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._resume is None:
            return worker, n_workers
        recorded = len(self._resume["workers"])
        if n_workers != recorded:
            raise ValueError(f"this stream resumes {recorded} loader workers' positions but runs {n_workers}")
        return (self._resume["next"] + worker) % n_workers, n_workers

    def _start(self) -> dict[str, Any] | None:
        """Where this worker starts: its recorded position when resumed, else None (the beginning)."""
        return None if self._resume is None else self._resume["workers"][self._worker()[0]]

    def _pool(self) -> list[str]:
        """Every shard this worker reads, in any epoch: its own part of the shard list."""
        worker, n_workers = self._worker()
        return self._epoch_shards(0, worker, n_workers)

    def _epoch_shards(self, epoch: int, worker: int, n_workers: int) -> list[str]:
        """This worker's shards in epoch ``epoch``'s order. The deal is fixed (epoch 0's, the shard list
        shuffled by ``seed``, dealt to ranks then workers), so ranks and workers never share a shard; later
        epochs reorder a worker's own shards."""
        urls = list(self.urls)
        shuffle = self.shuffle_shards or self.resampled
        if shuffle:
            random.Random(f"{self.seed}/epoch0").shuffle(urls)
        mine = urls[self.rank :: self.world_size][worker::n_workers]
        if shuffle and epoch > 0:
            random.Random(f"{self.seed}/{self.rank}/{worker}/epoch{epoch}").shuffle(mine)
        return mine

    def _shard_order(self, start: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """This worker's shards from ``start`` on, each with what reproduces the order from it: its ``epoch``
        and index ``shard`` in that epoch's order."""
        worker, n_workers = self._worker()
        if not self._pool():  # more workers than shards: this one has none (and must not spin)
            return
        epoch, first = (start["epoch"], start["shard"]) if start is not None else (0, 0)
        while self.resampled or self.epochs is None or epoch < self.epochs:
            shards = self._epoch_shards(epoch, worker, n_workers)
            for index in range(first, len(shards)):
                yield shards[index], {"epoch": epoch, "shard": index}
            epoch, first = epoch + 1, 0

    def samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, transformed; skips are counted into ``skipped``."""
        skipped = Counter() if skipped is None else skipped
        yield from (sample for sample, _ in self._positioned(skipped))

    def _positioned(self, skipped: Counter[str]) -> Iterator[tuple[Sample, dict[str, Any] | None]]:
        """Samples, each with this worker's position before it (None behind a shuffle buffer)."""
        start = self._start()
        if start is not None and start.get("end"):
            return
        decoded = self._decoded(skipped, start)
        if self.shuffle_buffer > 1:
            worker, _ = self._worker()
            rng = random.Random(f"{self.seed}/{self.rank}/{worker}/s")
            yield from ((s, None) for s in _shuffled((s for s, _ in decoded), self.shuffle_buffer, rng))
            return
        yield from decoded

    def _decoded(
        self, skipped: Counter[str], start: dict[str, Any] | None
    ) -> Iterator[tuple[Sample, dict[str, Any]]]:
        tally = _Tally(skipped)
        watch = _ShardWatch(self._pool(), self.require_samples, self._warned)
        offset = start["sample"] if start is not None else 0  # raw samples of the first shard consumed
        worker, _ = self._worker()
        if start is None and self.rank == 0 and worker == 0:
            for _ in range(self._duplicate_shards):
                tally("duplicate_shard")
        for url, order in self._shard_order(start):
            tally.shard, good = Counter(), 0
            for index, raw in _read_from(url, tally, offset):
                key = raw.get("__key__")
                if self.keep is not None and key and not self.keep(url, key, content_digest(raw)):
                    tally("not_kept")
                    continue
                sample = self._decode(raw, tally)
                if sample is not None:
                    good += 1
                    yield sample, {"worker": worker, "url": url, "sample": index, **order}
            watch.shard_done(url, good, tally.shard)
            offset = 0
        watch.end()

    def _decode(self, raw: dict[str, Any], count: Callable[[str], None]) -> Sample | None:
        dotted = dotted_pairs(raw)
        for _ in range(dotted):
            count("dotted_key")
        sample = decode_sample(raw, decode_size=self.decode_size)
        if isinstance(sample, str):
            if not (dotted and sample == "missing_image"):  # else the sample is those pairs, counted above
                count(sample)
            return None
        try:
            image = self.transform(sample.image)
        except Exception as exn:  # a user transform failing on one image must not end the stream
            count(f"transform_failed:{type(exn).__name__}")
            return None
        return Sample(sample.key, sample.url, image, sample.text, sample.meta, sample.digest)

    def __iter__(self) -> Iterator[SuperBatch]:
        # A full batch is held until the next sample arrives, so skips read after it (a bad tail) still go
        # into a batch; ``skipped`` is the one counter the sample generator writes into, emptied per batch.
        # The batch's position is the one before that next sample (whose skips go to the next batch), with
        # the index of this worker's next batch (``batch``: what its size is).
        # A sample already in the batch being filled is left out (``repeat_in_batch``); 2B of them in a row
        # prove that fewer than B distinct samples exist: within one epoch every sample comes once, so a run
        # of repeats longer than 2(B - 1) spans a whole epoch of samples all in the batch.
        skipped: Counter[str] = Counter()
        buffer: list[Sample] = []
        inside: set[tuple[str, str]] = set()
        repeats = 0
        t, stride = self._first_batch(), self._worker()[1]
        size = self._size(t)
        for sample, before in self._positioned(skipped):
            if len(buffer) == size:
                t += stride
                yield _collate(buffer, skipped, None if before is None else {**before, "batch": t})
                size = self._size(t)
                buffer = []
                inside.clear()
                skipped.clear()
            if (sample.url, sample.key) in inside:
                skipped["repeat_in_batch"] += 1
                repeats += 1
                if repeats >= 2 * size:
                    raise TooFewSamplesError(self._too_few(len(inside), size))
                continue
            repeats = 0
            inside.add((sample.url, sample.key))
            buffer.append(sample)
        if len(buffer) == size or (buffer and not self.drop_last):
            end = None if self.shuffle_buffer > 1 else {"worker": self._worker()[0], "end": True}
            yield _collate(buffer, skipped, end)

    def _first_batch(self) -> int:
        """The index (over the run) of this worker's next super-batch: the recorded one when resumed, else
        the worker's own index (round-robin)."""
        start = self._start()
        if start is None:
            return self._worker()[0]
        if "batch" in start:
            return int(start["batch"])
        if self.batch_sizes is not None:
            raise ValueError(
                "the recorded data position has no batch index (written by an older jestclip): it cannot "
                "resume a stream whose super-batch size changes per step"
            )
        return 0  # every batch has batch_size: the index is not needed

    def _size(self, t: int) -> int:
        """This rank's size of super-batch ``t``."""
        if self.batch_sizes is None:
            return self.batch_size
        size = self.batch_sizes(t)
        if not 1 <= size <= self.batch_size:
            raise ValueError(f"batch_sizes({t}) = {size} is not in [1, batch_size={self.batch_size}]")
        return size

    def _too_few(self, distinct: int, size: int) -> str:
        worker, n_workers = self._worker()
        return (
            f"a super-batch of {size} cannot be filled without repeating a sample: rank "
            f"{self.rank}'s loader worker {worker} reads {len(self._pool())} of {len(self.urls)} shards, "
            f"which hold only {distinct} readable samples; use more shards, fewer ranks or workers "
            f"({self.world_size} x {n_workers}), or a smaller batch"
        )

    def resumed(self, position: dict[str, Any]) -> SuperBatchStream:
        """A copy of this stream that starts where ``position`` (a ``ResumableBatches.position()``) left it;
        a ValueError when it cannot (a shuffle buffer, another kind of stream, shards that changed)."""
        if self.shuffle_buffer > 1:
            raise ValueError(
                f"shuffle_buffer={self.shuffle_buffer}: a stream with a shuffle buffer cannot resume at a "
                "recorded position (the buffer's contents are not recorded); use shuffle_buffer=0"
            )
        workers = list(position["workers"])
        for worker, start in enumerate(workers):
            self._check_start(worker, len(workers), start)
        stream = copy.copy(self)
        stream._resume = {"workers": workers, "next": int(position["next"]) % len(workers)}
        return stream

    def _check_start(self, worker: int, n_workers: int, start: dict[str, Any] | None) -> None:
        """A ValueError unless ``start`` is a position of this kind of stream whose shard is still there."""
        if start is None or start.get("end"):
            return
        where = f"rank {self.rank}'s loader worker {worker}"
        if "rng" in start:
            raise ValueError(
                f"the position recorded for {where} comes from a resampled stream that drew shards with "
                "replacement (jestclip before each worker kept its own shards); it cannot be continued: "
                "start the run again"
            )
        if start.get("worker") != worker or "epoch" not in start:
            raise ValueError(f"the position recorded for {where} is not this stream's: {_brief(start)}")
        shards = self._epoch_shards(start["epoch"], worker, n_workers)
        url = shards[start["shard"]] if start["shard"] < len(shards) else None
        if url != start["url"]:
            raise ValueError(
                f"cannot resume {where}: it was reading shard {start['url']}, but the shard list "
                f"({len(self.urls)} shards) now puts {url} there; the shards changed since the position was "
                "recorded"
            )


def _read_from(url: str, tally: _Tally, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """A shard's raw samples from the ``offset``-th on, numbered. The first ``offset`` (consumed before a
    resume) are re-read from the tar but not yielded, and the skips counted up to the ``offset``-th are
    dropped: they went with the batches before the resume."""
    live = offset == 0

    def count(reason: str) -> None:
        if live:
            tally(reason)

    for index, raw in enumerate(read_shard(url, count)):
        if index >= offset:
            live = True
            yield index, raw


def _brief(position: dict[str, Any]) -> str:
    return str(position)


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


def _collate(samples: list[Sample], skipped: Counter[str], position: dict[str, Any] | None) -> SuperBatch:
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
        position=position,
        digests=[s.digest for s in samples],
    )


class ResumableBatches(Iterator[SuperBatch]):
    """A stream's super-batches through ``num_workers`` DataLoader workers (0: in this process), from its
    beginning or from a recorded ``position``; ``position()`` says where it is now.

    The DataLoader hands out its workers' batches round-robin, so batch ``n`` after a position comes from
    worker ``(next + n) % workers``; each batch carries its worker's position after it, recorded here as the
    batch is consumed (batches the workers prefetched but nobody consumed are read again on resume).
    """

    def __init__(
        self, stream: SuperBatchStream, num_workers: int, position: dict[str, Any] | None = None
    ) -> None:
        self.workers = max(1, num_workers)  # 0 and 1 read the same stream
        if position is not None and "workers" not in position:
            kind = position.get("kind", "unknown")
            raise ValueError(
                f"the data position is of a {kind!r} source, not a stream's: resume with the source that "
                "recorded it (data_in_memory as when the run started)"
            )
        if position is not None:
            recorded = len(position["workers"])
            if recorded != self.workers:
                raise ValueError(
                    f"the data position was recorded with {_workers(recorded)}; resuming with "
                    f"num_workers={num_workers} would read other samples: use num_workers={recorded}"
                )
            stream = stream.resumed(position)
        self._workers: list[dict[str, Any] | None] = [None] * self.workers
        self._next = 0
        if position is not None:
            self._workers, self._next = list(position["workers"]), int(position["next"]) % self.workers
        self._exact = stream.shuffle_buffer <= 1
        self._batches = iter(DataLoader(stream, batch_size=None, num_workers=num_workers))

    def __next__(self) -> SuperBatch:
        batch = next(self._batches)
        if batch.position is not None:
            worker = batch.position["worker"]
            self._workers[worker] = batch.position
            self._next = (worker + 1) % self.workers
        return batch

    def position(self) -> dict[str, Any] | None:
        """Where the stream stands after the batches consumed so far: per loader worker, where its next batch
        starts (None: at the beginning), and which worker's batch comes next; None for a stream with a
        shuffle buffer."""
        return {"workers": list(self._workers), "next": self._next} if self._exact else None

    def positions(self) -> list[dict[str, Any] | None]:
        """Every rank's ``position()`` in rank order (under torch.distributed a collective: every rank calls
        it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [self.position()]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.position())
        return gathered


def _workers(n: int) -> str:
    return "num_workers=0 or 1" if n == 1 else f"num_workers={n}"
