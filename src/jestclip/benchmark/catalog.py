"""Enumerating the drawings each source ships, with their raw text as shipped.

A ``Drawing`` is a render recipe plus raw fields; turning fields into captions (raw for the pool, cleaned for
the curated set) is ``builder.py``'s job. Enumeration is deterministic (sorted paths).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from jestclip.benchmark.render import render_bitmap, render_glyph, render_svg
from jestclip.benchmark.sources import HELDOUT_THEMES, TRAIN_THEMES, SourcePaths, debian_licence

__all__ = [
    "Drawing",
    "EmojiInfo",
    "emoji_drawings",
    "emoji_table",
    "icon_drawings",
    "openclipart_drawings",
    "tuxpaint_drawings",
]


@dataclass(frozen=True)
class Drawing:
    """One drawing: how to render it and the raw fields its captions are made from.

    render: ("svg", path) | ("bitmap", path) | ("glyph", font_path, text).
    style: theme / font / collection the drawing is drawn in; concept: what it depicts (icon name, emoji
    code points, folder, stamp name).
    """

    source: str
    uid: str
    render: tuple[str, ...]
    style: str
    concept: str
    licence: str
    fields: dict[str, Any] = field(default_factory=dict)

    def image(self, size: int) -> Image.Image:
        kind, *args = self.render
        if kind == "svg":
            return render_svg(args[0], size)
        if kind == "bitmap":
            return render_bitmap(args[0], size)
        if kind == "glyph":
            return render_glyph(args[0], args[1], size)
        raise ValueError(f"unknown render kind {kind!r} for {self.uid}")


# --------------------------------------------------------------------------------------------- OpenClipart
_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "cc2": "http://creativecommons.org/ns#",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
_RDF_RESOURCE = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}resource"


def _openclipart_metadata(path: Path) -> dict[str, Any]:
    """Title, description, keywords and licence from an SVG's RDF metadata (empty fields when absent)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {"title": "", "description": "", "keywords": [], "licence_url": "", "metadata_error": True}
    work = None
    for ns in ("cc", "cc2"):
        work = root.find(f".//{{{_NS[ns]}}}Work")
        if work is not None:
            break

    def text_of(tag: str) -> str:
        if work is None:
            return ""
        node = work.find(f"dc:{tag}", _NS)
        return " ".join("".join(node.itertext()).split()) if node is not None else ""

    keywords = []
    if work is not None:
        keywords = [" ".join((li.text or "").split()) for li in work.findall("dc:subject//rdf:li", _NS)]
    licence = ""
    for ns in ("cc", "cc2"):
        node = root.find(f".//{{{_NS[ns]}}}license")
        if node is not None:
            licence = node.get(_RDF_RESOURCE, "") or "".join(node.itertext()).strip()
            break
    return {
        "title": text_of("title"),
        "description": text_of("description"),
        "keywords": [k for k in keywords if k],
        "licence_url": licence,
    }


def _licence_name(url: str) -> str:
    low = url.lower()
    if "publicdomain" in low or "public domain" in low:
        return "public-domain"
    if "gpl" in low:
        return "GPL-2"
    return "none stated" if not url else url


def openclipart_drawings(paths: SourcePaths) -> Iterator[Drawing]:
    """Every real (non-symlink) SVG; ``fields``: title, description, keywords, folder ("top/sub")."""
    root = paths.openclipart
    for path in sorted(root.rglob("*.svg")):
        if path.is_symlink():
            continue
        rel = path.relative_to(root)
        meta = _openclipart_metadata(path)
        folder = "/".join(rel.parts[:-1])
        yield Drawing(
            source="openclipart",
            uid=f"openclipart/{rel.with_suffix('')}",
            render=("svg", str(path)),
            style="openclipart",
            concept=folder,
            licence=_licence_name(meta.pop("licence_url")),
            fields={**meta, "folder": folder},
        )


# ------------------------------------------------------------------------------------------------ icons
_SIZE_DIR = re.compile(r"^(\d+)x\d+(@(\d)x)?$")


def _icon_file_rank(path: Path, theme_root: Path) -> tuple[int, int]:
    """Higher is better: scalable SVG first, then the largest bitmap size."""
    parts = path.relative_to(theme_root).parts
    if path.suffix == ".svg":
        return (2, 0)
    for part in parts:
        m = _SIZE_DIR.match(part)
        if m:
            return (1, int(m.group(1)) * int(m.group(3) or 1))
    return (0, 0)


def icon_drawings(paths: SourcePaths, themes: list[str] | None = None) -> Iterator[Drawing]:
    """One drawing per (theme, icon name), symbolic icons excluded, best file (SVG or largest PNG).

    Names that resolve to the same file within a theme are one drawing: ``fields["name"]`` is the first
    (sorted), ``fields["aliases"]`` the others. Also: context (apps, actions, ...), heldout (bool).
    """
    themes = themes or [*TRAIN_THEMES, *HELDOUT_THEMES]
    for theme in themes:
        package = TRAIN_THEMES.get(theme) or HELDOUT_THEMES.get(theme)
        if package is None:
            raise ValueError(f"unknown icon theme {theme!r}")
        licence = debian_licence(package)
        theme_root = paths.icons / theme
        best: dict[str, tuple[tuple[int, int], Path]] = {}
        for dirpath, _, files in os.walk(theme_root, followlinks=True):
            if "symbolic" in dirpath.lower():
                continue
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext not in (".svg", ".png") or "symbolic" in stem:
                    continue
                path = Path(dirpath) / name
                if not path.exists():  # dangling link
                    continue
                rank = _icon_file_rank(path, theme_root)
                if stem not in best or rank > best[stem][0]:
                    best[stem] = (rank, path)
        names_of: dict[str, list[str]] = {}
        for stem in sorted(best):
            names_of.setdefault(os.path.realpath(best[stem][1]), []).append(stem)
        for names in sorted(names_of.values()):
            stem, path = names[0], best[names[0]][1]
            rel = path.relative_to(theme_root).parts
            context = next((p for p in rel[:-1] if not _SIZE_DIR.match(p) and p != "scalable"), "")
            yield Drawing(
                source="icons",
                uid=f"icons/{theme}/{stem}",
                render=("svg" if path.suffix == ".svg" else "bitmap", str(path)),
                style=theme,
                concept=stem,
                licence=licence,
                fields={
                    "name": stem,
                    "aliases": names[1:],
                    "context": context,
                    "heldout": theme in HELDOUT_THEMES,
                },
            )


# ------------------------------------------------------------------------------------------------ emoji
@dataclass(frozen=True)
class EmojiInfo:
    """One fully-qualified emoji from emoji-test.txt with its CLDR English name and keywords."""

    codepoints: tuple[int, ...]
    group: str
    subgroup: str
    test_name: str  # the name emoji-test.txt gives
    cldr_name: str
    cldr_keywords: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def has_skin_tone(self) -> bool:
        return any(0x1F3FB <= c <= 0x1F3FF for c in self.codepoints)

    def hexcode(self, sep: str = "-", upper: bool = True, drop_fe0f: bool = False) -> str:
        cps = [c for c in self.codepoints if not (drop_fe0f and c == 0xFE0F)]
        return sep.join(f"{c:04X}" if upper else f"{c:x}" for c in cps)


def _cldr(paths: SourcePaths) -> tuple[dict[str, str], dict[str, list[str]]]:
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for path in paths.cldr_annotations:
        for node in ET.parse(path).getroot().iter("annotation"):
            cp, text = node.get("cp", ""), (node.text or "").strip()
            if node.get("type") == "tts":
                names.setdefault(cp, text)
            else:
                keywords.setdefault(cp, [k.strip() for k in text.split("|") if k.strip()])
    return names, keywords


def emoji_table(paths: SourcePaths) -> list[EmojiInfo]:
    """Fully-qualified emoji in emoji-test.txt order, outside the "Component" group."""
    names, keywords = _cldr(paths)
    group = subgroup = ""
    table = []
    for line in paths.emoji_test.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group != "Component":
            cps = tuple(int(h, 16) for h in line.split(";")[0].split())
            test_name = re.sub(r"^.*?E\d+\.\d+\s+", "", line.split("#", 1)[1]).strip()
            text = "".join(map(chr, cps))
            bare = text.replace("\ufe0f", "")
            cldr_name = names.get(text) or names.get(bare) or test_name
            table.append(
                EmojiInfo(
                    cps,
                    group,
                    subgroup,
                    test_name,
                    cldr_name,
                    tuple(keywords.get(text) or keywords.get(bare, [])),
                )
            )
    return table


def _unicode_names(cps: tuple[int, ...]) -> str:
    """The raw upper-case Unicode character names of a sequence, variation selectors dropped."""
    return " ".join(unicodedata.name(chr(c), f"U+{c:04X}") for c in cps if c != 0xFE0F)


def emoji_drawings(paths: SourcePaths) -> Iterator[Drawing]:
    """Noto (font glyphs), EmojiOne (PNG), Twemoji and OpenMoji (SVG) drawings of the fully-qualified emoji.

    ``fields``: unicode_name (raw names), cldr_name, cldr_keywords, group, subgroup, skin_tone, and for
    EmojiOne its shortname.
    """
    table = emoji_table(paths)
    gemoji_index = json.loads((paths.gemojione / "config" / "index.json").read_text(encoding="utf-8"))
    gemoji_by_hex = {v["unicode"].upper(): v for v in gemoji_index.values()}
    npm_licences = {}
    for name, root in (("twemoji", paths.twemoji), ("openmoji", paths.openmoji)):
        package = (
            json.loads((root / "package.json").read_text(encoding="utf-8"))
            if (root / "package.json").exists()
            else {}
        )
        npm_licences[name] = str(package.get("license", "unknown"))
    styles: list[tuple[str, str]] = [("noto", "OFL-1.1"), ("emojione", debian_licence("ruby-gemojione"))]
    styles += [("twemoji", npm_licences["twemoji"]), ("openmoji", npm_licences["openmoji"])]
    for info in table:
        fields = {
            "unicode_name": _unicode_names(info.codepoints),
            "cldr_name": info.cldr_name,
            "cldr_keywords": list(info.cldr_keywords),
            "group": info.group,
            "subgroup": info.subgroup,
            "skin_tone": info.has_skin_tone,
        }
        concept = info.hexcode()
        for style, licence in styles:
            render: tuple[str, ...] | None = None
            extra: dict[str, Any] = {}
            if style == "noto":
                render = ("glyph", str(paths.noto_font), info.text)
            elif style == "emojione":
                entry = gemoji_by_hex.get(info.hexcode(drop_fe0f=True).upper()) or gemoji_by_hex.get(concept)
                png = (
                    paths.gemojione / "assets" / "png" / f"{entry['unicode'].upper()}.png" if entry else None
                )
                if png is not None and png.exists():
                    render, extra = ("bitmap", str(png)), {"shortname": entry["shortname"]}
            elif style == "twemoji":
                for candidate in (info.hexcode("-", False, True), info.hexcode("-", False, False)):
                    svg = paths.twemoji / f"{candidate}.svg"
                    if svg.exists():
                        render = ("svg", str(svg))
                        break
            else:
                for candidate in (info.hexcode("-", True, False), info.hexcode("-", True, True)):
                    svg = paths.openmoji / "color" / "svg" / f"{candidate}.svg"
                    if svg.exists():
                        render = ("svg", str(svg))
                        break
            if render is None:
                continue
            yield Drawing(
                "emoji", f"emoji/{style}/{concept}", render, style, concept, licence, {**fields, **extra}
            )


# --------------------------------------------------------------------------------------------- TuxPaint
def _stamp_captions(path: Path) -> dict[str, str]:
    """{"en": first line, lang: translation, ...} from a TuxPaint stamp's .txt file."""
    lines = [
        ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    if not lines:
        return {}
    captions = {"en": lines[0]}
    for line in lines[1:]:
        match = re.match(r"^([A-Za-z_@]+)\.utf8=(.*)$", line)
        if match and match.group(2).strip():
            captions.setdefault(match.group(1), match.group(2).strip())
    return captions


def tuxpaint_drawings(paths: SourcePaths) -> Iterator[Drawing]:
    """One drawing per stamp with a caption file (PNG preferred over SVG); ``fields``: captions, category."""
    root = paths.tuxpaint
    licence = debian_licence("tuxpaint-stamps-default")
    for txt in sorted(root.rglob("*.txt")):
        image = next(
            (txt.with_suffix(ext) for ext in (".png", ".svg") if txt.with_suffix(ext).exists()), None
        )
        captions = _stamp_captions(txt)
        if image is None or not captions:
            continue
        rel = txt.relative_to(root).with_suffix("")
        yield Drawing(
            source="tuxpaint",
            uid=f"tuxpaint/{rel}",
            render=("bitmap" if image.suffix == ".png" else "svg", str(image)),
            style="tuxpaint",
            concept=str(rel),
            licence=licence,
            fields={"captions": captions, "category": rel.parts[0]},
        )
