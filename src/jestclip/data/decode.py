"""One raw webdataset sample's bytes to a ``Sample`` (an RGB image, its caption and metadata), or the named
reason it is skipped (``DECODE_REASONS``).

Images decode only in web formats (``IMAGE_FORMATS``) and as a viewer shows them (``to_rgb``); their size and
aspect ratio are checked from the header before any pixel is decoded (``MAX_IMAGE_PIXELS``,
``MAX_ASPECT_RATIO``), which bounds every image's work. Nothing here raises on bad bytes, reads a file or
makes a tensor: shards are read by ``data.tarread``, samples batched by ``data.stream``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
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

__all__ = [
    "DECODE_REASONS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "Sample",
    "caption_is_empty",
    "content_digest",
    "decode_sample",
    "dotted_pairs",
    "open_image",
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

DECODE_REASONS = (
    "missing_key",
    "missing_image",
    "bad_image",
    "unsupported_image_mode",
    "image_too_large",
    "aspect_ratio_too_large",
    "missing_text",
    "bad_text",
    "empty_text",
    "bad_json",
)
"""What ``decode_sample`` returns instead of a ``Sample``; each counts one skipped sample.

============================  ==========================================================================
reason                        what was skipped
============================  ==========================================================================
``missing_key``               a sample without a key
``missing_image``             no ``png``/``jpg``/``jpeg``/``webp`` member
``bad_image``                 image bytes that do not decode (or decode to a format outside ``IMAGE_FORMATS``)
``unsupported_image_mode``    pixels of a kind no web format holds (float ``F``, ``LAB``, ...); see ``to_rgb``
``image_too_large``           an image over ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb or a mistake)
``aspect_ratio_too_large``    an image whose longer side is over ``MAX_ASPECT_RATIO`` times its shorter one
                              (a 1 x 8000 line): resizing its shorter side to the model's input would make it
                              huge
``missing_text``              no ``txt`` member
``bad_text``                  a ``txt`` member that is not UTF-8
``empty_text``                a caption that is empty once cleaned as open_clip's tokenizers clean it
                              (``caption_is_empty``: ``&nbsp;``, ``&amp;nbsp;``, a byte-order mark, NUL bytes)
``bad_json``                  a ``json`` member that is not a JSON object
============================  ==========================================================================
"""


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


def decode_sample(raw: dict[str, Any], *, decode_size: int | None = None) -> Sample | str:
    """Decode one raw webdataset sample; return a Sample, or the reason it was skipped (``DECODE_REASONS``).

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
