"""Rendering drawings to square RGB images on white: SVG (resvg), bitmaps (Pillow), emoji font glyphs."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np
import resvg_py
from PIL import Image, ImageDraw, ImageFont

__all__ = ["RenderError", "fit_square", "ink_fraction", "render_bitmap", "render_glyph", "render_svg"]

# Pillow refuses images above ~179 Mpx by default; some shipped PNGs are that large. 1 Gpx guards memory.
Image.MAX_IMAGE_PIXELS = 1 << 30

_UNIT_PX = {"px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}
_ROOT = re.compile(r"<svg\b[^>]*>", re.IGNORECASE | re.DOTALL)
_SIZE_ATTR = re.compile(r"""(\s)(width|height)\s*=\s*(["'])\s*([0-9.eE+-]+)\s*([a-zA-Z%]*)\s*\3""")


class RenderError(ValueError):
    """A drawing could not be rendered (named by its path or code point)."""


def _px_sizes(svg: str) -> str:
    """Rewrite the root element's width/height from pt/mm/cm/in/pc/% to plain pixels (resvg rejects units)."""
    match = _ROOT.search(svg)
    if match is None:
        raise RenderError("no <svg> root element")
    root = match.group(0)
    has_viewbox = "viewbox" in root.lower()

    def fix(m: re.Match[str]) -> str:
        space, name, quote, number, unit = m.groups()
        unit = unit.lower()
        if unit in ("", "px"):
            return m.group(0)
        if unit == "%" or unit not in _UNIT_PX:
            return "" if has_viewbox else m.group(0)
        return f"{space}{name}={quote}{float(number) * _UNIT_PX[unit]:.3f}{quote}"

    return svg[: match.start()] + _SIZE_ATTR.sub(fix, root) + svg[match.end() :]


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Composite onto white (transparency), scale the long side to ``size``, centre on a white square."""
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image).convert("RGB")
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def render_svg(path: str | Path, size: int) -> Image.Image:
    """Render an SVG file to a ``size`` x ``size`` RGB image (aspect kept, white background).

    Text elements are drawn without system fonts, so renders do not depend on the machine's fonts.
    """
    try:
        svg = _px_sizes(Path(path).read_text(encoding="utf-8", errors="replace"))
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, skip_system_fonts=True)
        image = Image.open(io.BytesIO(bytes(png)))
        image.load()
    except (ValueError, OSError, RuntimeError) as exn:
        raise RenderError(f"{path}: {exn}") from exn
    return fit_square(image, size)


def render_bitmap(path: str | Path, size: int) -> Image.Image:
    """Load a PNG (or any Pillow format) and fit it to a ``size`` square on white."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size * 2, size * 2))
            image.load()
            return fit_square(image, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exn:
        raise RenderError(f"{path}: {exn}") from exn


@functools.lru_cache(maxsize=4)
def _font(path: str, font_size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, font_size)


def render_glyph(font_path: str | Path, text: str, size: int, font_size: int = 109) -> Image.Image:
    """Draw a colour font glyph sequence (e.g. Noto Color Emoji, whose bitmaps exist at size 109)."""
    font = _font(str(font_path), font_size)
    canvas = Image.new("RGBA", (font_size * 3, font_size * 2), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((font_size // 2, font_size // 4), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise RenderError(
            f"{font_path}: nothing drawn for {text!r} ({' '.join(f'U+{ord(c):04X}' for c in text)})"
        )
    return fit_square(canvas.crop(box), size)


def ink_fraction(image: Image.Image) -> float:
    """Fraction of pixels that are not (near) white: a near-blank render scores close to 0."""
    pixels = np.asarray(image.convert("L"))
    return float((pixels < 245).mean())
