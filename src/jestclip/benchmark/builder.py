"""The offline curation benchmark: an uncurated ``pool``, a small clean ``curated`` set, held-out ``eval``.

``plan`` turns the catalog's drawings into captioned entries per part (pure, deterministic for a seed);
``build`` renders and writes them as webdataset shards with manifests, resumably:

    OUT/build.json                      resolved config, filter pass rates, noise measurements
    OUT/pool/00000.tar ... manifest.json
    OUT/curated/00000.tar ... manifest.json
    OUT/eval/<suite>/00000.tar ... manifest.json (with the suite's class names and prompt templates)

Eval images are rendered first; any training image with the same pixels is dropped, so nothing held out
leaks into ``pool`` or ``curated``.

Every pool sample's JSON carries its ground truth, ``quality`` (``jestclip.data.quality``): the caption the
curated filters give its drawing (``clean_caption``, None when they reject it), every noise kind its pair
carries, and ``clean`` = a clean caption exists and no kind is named. The quality filters judge every
training drawing; that ``curated`` holds only some icon themes and only Noto's emoji is a size choice, not a
filter. The pool manifest (and so ``build.json``) has the pool's ``composition`` (``tally``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jestclip.benchmark.catalog import (
    Drawing,
    emoji_drawings,
    icon_drawings,
    openclipart_drawings,
    tuxpaint_drawings,
)
from jestclip.benchmark.render import RenderError, ink_fraction
from jestclip.benchmark.sources import SourcePaths, missing_sources
from jestclip.data.files import atomic_json
from jestclip.data.progress import progress
from jestclip.data.quality import (
    ALIAS_REPEAT,
    BOILERPLATE_TITLE,
    FILENAME_TITLE,
    GENERIC_KEYWORDS,
    LEGACY_PREFIX,
    MIME_TYPE,
    NEAR_BLANK,
    NON_ENGLISH,
    NUMBERED_NAME,
    QUALITY_KEY,
    RARE_NAME,
    RAW_UNICODE_NAME,
    SHORTNAME,
    SKIN_TONE_REPEAT,
    merge_tallies,
    quality_entry,
    tally,
)
from jestclip.data.shards import Pair, png_bytes, shard_name, write_shard

__all__ = ["SOURCES", "BuildConfig", "Entry", "Plan", "build", "plan", "write_plan"]

SOURCES: tuple[str, ...] = ("openclipart", "icons", "emoji", "tuxpaint")
BLANK_INK = 0.005  # renders with less than 0.5% non-white pixels count as blank
# The layout of what a build writes; a directory written in another format is not resumed. Format 2: pool
# samples carry a ``quality`` entry (jestclip.data.quality) and the pool manifest its ``composition``.
BUILD_FORMAT = 2


@dataclass(frozen=True)
class BuildConfig:
    size: int = 64
    seed: int = 0
    sources: tuple[str, ...] = SOURCES
    limit: int | None = None  # at most this many drawings per source (a seeded subset), for quick builds
    shard_size: int = 1000
    workers: int = max(1, min(8, os.cpu_count() or 1))
    heldout_fraction: float = 0.2  # of OpenClipart's populated folders and of TuxPaint stamps
    populated_folder: int = 20  # OpenClipart folders with at least this many drawings are eval classes
    boilerplate_title: int = 10  # an OpenClipart title shared by this many drawings is boilerplate
    generic_keyword: float = 0.1  # a keyword on more than this fraction of OpenClipart drawings is generic
    semantic_themes: int = 5  # an icon name in at least this many themes is a semantic (class) name
    curated_icon_themes: tuple[str, ...] = ("Papirus", "Adwaita", "elementary")


@dataclass(frozen=True)
class Entry:
    """One pair to write: ``key`` unique within its part, the drawing, its caption and JSON metadata."""

    key: str
    drawing: Drawing
    text: str
    meta: dict[str, Any]


@dataclass
class Plan:
    parts: dict[str, list[Entry]]  # "pool", "curated", "eval/<suite>"
    suites: dict[str, dict[str, Any]]  # eval suite -> {"classes": {task: [names]}, "templates": [...]}
    stats: dict[str, Any] = field(default_factory=dict)


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (for seeded splits and choices)."""
    digest = hashlib.sha1("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _key(part: str, uid: str, variant: str = "") -> str:
    return hashlib.sha1(f"{part}|{uid}|{variant}".encode()).hexdigest()[:20]


def _meta(d: Drawing, **extra: Any) -> dict[str, Any]:
    return {
        "source": d.source,
        "uid": d.uid,
        "style": d.style,
        "concept": d.concept,
        "licence": d.licence,
        **extra,
    }


# ------------------------------------------------------------------------------------------- OpenClipart
_WORD = re.compile(r"[^\W\d_]+")
_FILENAME_LIKE = re.compile(r"[_#]|\.(svg|png|jpe?g)$|[A-Za-z]\d|\d[A-Za-z]|^clipart by ", re.IGNORECASE)


class EnglishWords:
    """English-ness of short texts against a word list (``/usr/share/dict/words`` from Debian's wamerican)."""

    def __init__(self, path: Path) -> None:
        words = path.read_text(encoding="utf-8", errors="replace").split()
        self.words = {w.casefold() for w in words if "'" not in w}

    def is_english(self, text: str, threshold: float = 0.75) -> bool:
        if not text.isascii():
            return False
        words = [w.casefold() for w in _WORD.findall(text) if len(w) > 1]
        if not words:
            return False
        known = sum(w in self.words or w.rstrip("s") in self.words for w in words)
        return known / len(words) >= threshold


def _plan_openclipart(
    catalog: list[Drawing], drawings: list[Drawing], cfg: BuildConfig, english: EnglishWords, out: Plan
) -> None:
    n = len(catalog)
    titles = Counter(d.fields["title"].casefold() for d in catalog if d.fields["title"])
    keyword_counts = Counter(k.casefold() for d in catalog for k in set(d.fields["keywords"]))
    generic = {k for k, c in keyword_counts.items() if c > cfg.generic_keyword * n} | {"unsorted"}
    folders = Counter(d.fields["folder"] for d in catalog)
    populated = sorted(f for f, c in folders.items() if c >= cfg.populated_folder and "/" in f)
    leaf_counts = Counter(f.split("/")[-1] for f in populated)

    def class_name(folder: str) -> str:
        top, leaf = folder.split("/")[0], folder.split("/")[-1]
        name = leaf if leaf_counts[leaf] == 1 else f"{top} {leaf}"
        return " ".join(name.replace("_", " ").replace("-", " ").split())

    classes = [class_name(f) for f in populated]
    class_id = {f: i for i, f in enumerate(populated)}
    checks: Counter[str] = Counter()
    for d in drawings:
        title, desc, keywords = d.fields["title"], d.fields["description"], d.fields["keywords"]
        heldout = d.fields["folder"] in class_id and _unit(cfg.seed, "heldout", d.uid) < cfg.heldout_fraction
        if heldout:
            label = class_id[d.fields["folder"]]
            entry = Entry(
                _key("eval", d.uid), d, classes[label], _meta(d, labels={"folder": label}, caption=title)
            )
            out.parts["eval/openclipart"].append(entry)
            continue
        specific = bool(title) and titles[title.casefold()] < cfg.boilerplate_title
        plain = specific and not _FILENAME_LIKE.search(title)
        title_ok = plain and english.is_english(title)
        desc_english = bool(desc) and english.is_english(desc)
        desc_ok = desc_english and len(desc) <= 300
        specific_keywords = [k for k in keywords if k.casefold() not in generic]
        good_keywords = [k.replace("_", " ") for k in specific_keywords if english.is_english(k)]
        checks["seen"] += 1
        checks["specific_title"] += specific
        checks["not_filename_like"] += plain
        checks["english_title"] += title_ok
        checks["english_description"] += desc_ok
        checks["non_generic_keyword"] += bool(good_keywords)
        curated = None
        if (title_ok or desc_ok) and good_keywords:
            checks["curated"] += 1
            main = title if title_ok else desc
            extra = [k for k in dict.fromkeys(k.casefold() for k in good_keywords) if k != main.casefold()]
            curated = ", ".join([main, *extra[:6]])
            out.parts["curated"].append(Entry(_key("curated", d.uid), d, curated, _meta(d)))
        raw = " ".join(x for x in (title, desc, " ".join(keywords)) if x)
        if not raw:
            checks["pool_no_text"] += 1
            continue
        noise = {
            BOILERPLATE_TITLE: bool(title) and not specific,
            FILENAME_TITLE: specific and not plain,
            NON_ENGLISH: (plain and not title_ok)
            or (bool(desc) and not desc_english)
            or (bool(specific_keywords) and not good_keywords),
            GENERIC_KEYWORDS: not specific_keywords,
        }
        quality = quality_entry(curated, [kind for kind, carried in noise.items() if carried])
        out.parts["pool"].append(Entry(_key("pool", d.uid), d, raw, _meta(d, **{QUALITY_KEY: quality})))
    out.suites["openclipart"] = {
        "classes": {"folder": classes},
        "templates": ["a drawing of {}.", "clip art of {}.", "an illustration of {}."],
        "tasks": ["zeroshot:folder", "fewshot:folder"],
    }
    specific_titles = [
        t for d in catalog if (t := d.fields["title"]) and titles[t.casefold()] < cfg.boilerplate_title
    ]
    out.stats["openclipart"] = {
        "drawings": n,
        "boilerplate_title_share": sum(c for c in titles.values() if c >= cfg.boilerplate_title) / max(1, n),
        "specific_titles": len(specific_titles),
        "specific_titles_not_english": sum(not english.is_english(t) for t in specific_titles),
        "filename_like_titles": sum(1 for d in catalog if _FILENAME_LIKE.search(d.fields["title"] or "")),
        "empty_titles": sum(1 for d in catalog if not d.fields["title"]),
        "with_description": sum(1 for d in catalog if d.fields["description"]),
        "generic_keywords": {k: keyword_counts[k] for k in sorted(generic)},
        "only_unsorted_keyword": sum(
            1 for d in catalog if [k.casefold() for k in d.fields["keywords"]] == ["unsorted"]
        ),
        "top_titles": titles.most_common(5),
        "curated_filter_pass": dict(checks),
        "eval_folders": len(populated),
    }


# ------------------------------------------------------------------------------------------------- icons
_LEGACY = re.compile(r"^(gtk-|stock_|gnome-|yast_|xfce-|kde-|mate-)")
_MIME = re.compile(r"(^|-)x-|^(application|text|audio|video|image|inode|package|model|font|multipart)-")
_FRAME = re.compile(r"\d+$")


def _is_semantic_form(name: str) -> bool:
    return not (_LEGACY.search(name) or _MIME.search(name) or _FRAME.search(name))


def _words(name: str) -> str:
    return " ".join(re.split(r"[-_.\s]+", name)).strip()


def _icon_caption(name: str | None, english: EnglishWords) -> str | None:
    """The curated caption of an icon whose semantic name is ``name``: "edit cut icon"; None unless every
    word of the name is English (or without a semantic name)."""
    if name is None or not english.is_english(_words(name), threshold=1.0):
        return None
    return f"{_words(name)} icon"


def _icon_noise(name: str, themes: int, cfg: BuildConfig, english: EnglishWords) -> list[str]:
    """The caption-borne noise kinds of the icon name ``name``, found in ``themes`` themes."""
    noise = {
        LEGACY_PREFIX: bool(_LEGACY.search(name)),
        MIME_TYPE: bool(_MIME.search(name)),
        NUMBERED_NAME: bool(_FRAME.search(name)),
    }
    if _is_semantic_form(name):
        noise[RARE_NAME] = themes < cfg.semantic_themes
        noise[NON_ENGLISH] = not english.is_english(_words(name), threshold=1.0)
    return [kind for kind, carried in noise.items() if carried]


def _plan_icons(
    catalog: list[Drawing], drawings: list[Drawing], cfg: BuildConfig, english: EnglishWords, out: Plan
) -> None:
    themes_of: dict[str, set[str]] = defaultdict(set)
    for d in catalog:
        for name in (d.fields["name"], *d.fields["aliases"]):
            themes_of[name].add(d.style)
    semantic = {n for n, t in themes_of.items() if len(t) >= cfg.semantic_themes and _is_semantic_form(n)}

    def semantic_name(d: Drawing) -> str | None:
        return next((n for n in (d.fields["name"], *d.fields["aliases"]) if n in semantic), None)

    heldout = [d for d in catalog if d.fields["heldout"]]
    classes = sorted({n for d in heldout if (n := semantic_name(d))})
    class_id = {n: i for i, n in enumerate(classes)}
    checks: Counter[str] = Counter()
    for d in drawings:
        name = semantic_name(d)
        if d.fields["heldout"]:
            if name is not None:
                text = f"{_words(name)} icon"
                meta = _meta(d, labels={"name": class_id[name]}, name=name)
                out.parts["eval/icons"].append(Entry(_key("eval", d.uid), d, text, meta))
            continue
        # the quality filters (a semantic English name) judge every training theme's drawing; only the
        # curated themes' drawings are written to `curated` (a size choice, not a quality filter)
        caption = _icon_caption(name, english)
        representative = name or d.fields["name"]  # the pair a curator keeps; the others repeat its image
        for alias in (d.fields["name"], *d.fields["aliases"]):
            noise = _icon_noise(alias, len(themes_of[alias]), cfg, english)
            noise += [ALIAS_REPEAT] if alias != representative else []
            meta = _meta(d, name=alias, **{QUALITY_KEY: quality_entry(caption, noise)})
            out.parts["pool"].append(Entry(_key("pool", d.uid, alias), d, alias, meta))
        if d.style in cfg.curated_icon_themes:
            checks["seen"] += 1
            checks["semantic_name"] += name is not None
            if caption is not None:
                checks["curated"] += 1
                out.parts["curated"].append(Entry(_key("curated", d.uid), d, caption, _meta(d)))
    names = [n for d in catalog for n in (d.fields["name"], *d.fields["aliases"])]
    out.suites["icons"] = {
        "classes": {"name": [_words(n) for n in classes]},
        "templates": ["{} icon.", "an icon of {}.", "a {} symbol."],
        "tasks": ["zeroshot:name", "retrieval"],  # ~1.8 images per name: too few for 10-shot
    }
    out.stats["icons"] = {
        "drawings": len(catalog),
        "name_theme_pairs": len(names),
        "legacy_prefix_names": sum(bool(_LEGACY.search(n)) for n in names),
        "mime_type_names": sum(bool(_MIME.search(n)) for n in names),
        "numbered_frame_names": sum(bool(_FRAME.search(n)) for n in names),
        "alias_groups": sum(1 for d in catalog if d.fields["aliases"]),
        "semantic_names": len(semantic),
        "curated_filter_pass": dict(checks),
    }


# ------------------------------------------------------------------------------------------------- emoji
def _emoji_caption(f: dict[str, Any]) -> str | None:
    """The curated caption of an emoji: "unicorn emoji, face" (CLDR name and keywords); None for a
    skin-tone variant."""
    if f["skin_tone"]:
        return None
    keywords = [k for k in f["cldr_keywords"] if k != f["cldr_name"]]
    return ", ".join([f"{f['cldr_name']} emoji", *keywords])


def _shortname_words(shortname: str) -> str:
    return " ".join(shortname.strip(":").replace("_", " ").split())


def _plan_emoji(catalog: list[Drawing], drawings: list[Drawing], cfg: BuildConfig, out: Plan) -> None:
    heldout_styles = ("twemoji", "openmoji")
    evaluated = [d for d in catalog if d.style in heldout_styles and not d.fields["skin_tone"]]
    label_sets = {
        task: sorted({d.fields[field] for d in evaluated})
        for task, field in (("name", "cldr_name"), ("group", "group"), ("subgroup", "subgroup"))
    }
    ids = {task: {n: i for i, n in enumerate(names)} for task, names in label_sets.items()}
    checks: Counter[str] = Counter()
    for d in drawings:
        f = d.fields
        if d.style in heldout_styles:
            if not f["skin_tone"]:
                labels = {"name": ids["name"][f["cldr_name"]], "group": ids["group"][f["group"]]}
                labels["subgroup"] = ids["subgroup"][f["subgroup"]]
                out.parts["eval/emoji"].append(
                    Entry(_key("eval", d.uid), d, f["cldr_name"], _meta(d, labels=labels))
                )
            continue
        # the quality filter (no skin-tone modifier) judges both training styles; only Noto's drawings are
        # written to `curated` (a size choice). Text that reads as the CLDR name, case aside, is no noise.
        caption = _emoji_caption(f)
        cldr = f["cldr_name"].casefold()
        if d.style == "noto":
            raw = f["unicode_name"]
            noise = [RAW_UNICODE_NAME] if raw.casefold() != cldr else []
        else:
            raw = f.get("shortname", "")
            noise = [SHORTNAME] if _shortname_words(raw).casefold() != cldr else []
        noise += [SKIN_TONE_REPEAT] if f["skin_tone"] else []
        if raw:
            meta = _meta(d, **{QUALITY_KEY: quality_entry(caption, noise)})
            out.parts["pool"].append(Entry(_key("pool", d.uid), d, raw, meta))
        if d.style == "noto":
            checks["seen"] += 1
            if caption is not None:
                checks["curated"] += 1
                out.parts["curated"].append(Entry(_key("curated", d.uid), d, caption, _meta(d)))
    out.suites["emoji"] = {
        "classes": label_sets,
        "templates": ["{} emoji.", "an emoji of {}.", "a {} icon."],
        "tasks": ["zeroshot:name", "zeroshot:group", "zeroshot:subgroup", "retrieval", "fewshot:subgroup"],
    }
    noto = [d for d in catalog if d.style == "noto"]
    out.stats["emoji"] = {
        "drawings": len(catalog),
        "by_style": dict(Counter(d.style for d in catalog)),
        "noto_skin_tone_variants": sum(d.fields["skin_tone"] for d in noto),
        "curated_filter_pass": dict(checks),
    }


# ---------------------------------------------------------------------------------------------- TuxPaint
def _plan_tuxpaint(catalog: list[Drawing], drawings: list[Drawing], cfg: BuildConfig, out: Plan) -> None:
    languages: Counter[str] = Counter()
    for d in drawings:
        captions = d.fields["captions"]
        english = captions["en"]
        if _unit(cfg.seed, "heldout", d.uid) < cfg.heldout_fraction:
            out.parts["eval/tuxpaint"].append(Entry(_key("eval", d.uid), d, english, _meta(d)))
            continue
        langs = sorted(captions)
        lang = langs[int(_unit(cfg.seed, "language", d.uid) * len(langs))]
        languages[lang] += 1
        noise = [] if lang == "en" or lang.startswith("en_") else [NON_ENGLISH]  # en_GB, en_AU are English
        meta = _meta(d, language=lang, **{QUALITY_KEY: quality_entry(english, noise)})
        out.parts["pool"].append(Entry(_key("pool", d.uid), d, captions[lang], meta))
        out.parts["curated"].append(Entry(_key("curated", d.uid), d, english, _meta(d, language="en")))
    out.suites["tuxpaint"] = {"classes": {}, "templates": [], "tasks": ["retrieval"]}
    out.stats["tuxpaint"] = {
        "drawings": len(catalog),
        "mean_languages_per_stamp": float(np.mean([len(d.fields["captions"]) for d in catalog]))
        if catalog
        else 0.0,
        "pool_english_captions": languages["en"],
        "pool_languages": len(languages),
    }


def _drawings(source: str, paths: SourcePaths) -> Iterable[Drawing]:
    return {
        "openclipart": openclipart_drawings,
        "icons": icon_drawings,
        "emoji": emoji_drawings,
        "tuxpaint": tuxpaint_drawings,
    }[source](paths)


def plan(cfg: BuildConfig, paths: SourcePaths) -> Plan:
    """Enumerate the sources and caption every drawing for each part it belongs to."""
    unknown = [s for s in cfg.sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {list(SOURCES)}")
    missing = missing_sources(paths, list(cfg.sources))
    if missing:
        lines = [f"  {s}: {', '.join(map(str, ps[:3]))}" for s, ps in missing.items()]
        raise FileNotFoundError(
            "benchmark sources are not installed:\n"
            + "\n".join(lines)
            + "\nrun: jestclip data sources --install"
        )
    out = Plan(parts=defaultdict(list), suites={})
    english = EnglishWords(paths.words)
    planners = {
        "openclipart": lambda cat, ds: _plan_openclipart(cat, ds, cfg, english, out),
        "icons": lambda cat, ds: _plan_icons(cat, ds, cfg, english, out),
        "emoji": lambda cat, ds: _plan_emoji(cat, ds, cfg, out),
        "tuxpaint": lambda cat, ds: _plan_tuxpaint(cat, ds, cfg, out),
    }
    for source in progress(cfg.sources, desc="catalog", unit="source"):
        # corpus statistics (boilerplate titles, semantic names, classes) always come from the whole catalog;
        # `limit` only chooses which drawings are written
        catalog = list(_drawings(source, paths))
        drawings = catalog
        if cfg.limit is not None:
            drawings = sorted(catalog, key=lambda d: _unit(cfg.seed, "limit", d.uid))[: cfg.limit]
            drawings.sort(key=lambda d: d.uid)
        planners[source](catalog, drawings)
    for part in ("pool", "curated"):
        random.Random(f"{cfg.seed}/{part}").shuffle(out.parts[part])
    out.parts = dict(out.parts)
    return out


# ------------------------------------------------------------------------------------------------- build
_EVAL_HASHES: frozenset[str] = frozenset()


def _init_worker(eval_hashes: frozenset[str]) -> None:
    """A render worker: the eval images' hashes, and SIGTERM's default action. A worker forked from
    ``jestclip``'s main process inherits its handler, which ignores the signal outside the main process, and
    ``Pool.terminate`` (leaving the pool's ``with``) stops its workers with SIGTERM: it would wait forever."""
    global _EVAL_HASHES
    _EVAL_HASHES = eval_hashes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_shard_task(args: tuple[str, Path, list[Entry], int]) -> dict[str, Any]:
    """Render and write one shard; return its stats (also saved next to it as ``NNNNN.json``)."""
    part, path, entries, size = args
    skipped: Counter[str] = Counter()
    hashes: list[str] = []
    written: Counter[str] = Counter()
    metas: list[dict[str, Any]] = []
    renders: dict[str, tuple[bytes, str, float] | None] = {}

    def pairs() -> Iterable[Pair]:
        for entry in entries:
            uid = entry.drawing.uid
            if uid not in renders:
                try:
                    image = entry.drawing.image(size)
                    renders[uid] = (
                        png_bytes(image),
                        hashlib.sha1(image.tobytes()).hexdigest(),
                        ink_fraction(image),
                    )
                except RenderError:
                    renders[uid] = None
            rendered = renders[uid]
            if rendered is None:
                skipped["render_error"] += 1
                continue
            png, digest, ink = rendered
            if part != "pool" and ink < BLANK_INK:
                skipped["blank"] += 1
                continue
            if not part.startswith("eval") and digest in _EVAL_HASHES:
                skipped["same_image_as_eval"] += 1
                continue
            hashes.append(digest)
            written[entry.drawing.source] += 1
            meta = {**entry.meta, "image_sha1": digest}
            if QUALITY_KEY in meta and ink < BLANK_INK:  # a pool render the curated filters would drop
                meta[QUALITY_KEY] = quality_entry(None, [*meta[QUALITY_KEY]["noise"], NEAR_BLANK])
            metas.append(meta)
            yield Pair(entry.key, png, entry.text, meta)

    count = write_shard(path, pairs())
    stats = {"shard": path.name, "count": count, "by_source": dict(written), "skipped": dict(skipped)}
    if any(QUALITY_KEY in m for m in metas):
        stats["composition"] = tally(metas)
    atomic_json(path.with_suffix(".json"), {**stats, "image_sha1": hashes})
    return stats


def _write_part(
    out: Path,
    part: str,
    entries: list[Entry],
    cfg: BuildConfig,
    eval_hashes: frozenset[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    root = out / part
    root.mkdir(parents=True, exist_ok=True)
    tasks, done = [], []
    for i in range(0, max(1, len(entries)), cfg.shard_size):
        path = root / shard_name(i // cfg.shard_size)
        chunk = entries[i : i + cfg.shard_size]
        if path.exists() and path.with_suffix(".json").exists():
            done.append(json.loads(path.with_suffix(".json").read_text(encoding="utf-8")))
        else:
            tasks.append((part, path, chunk, cfg.size))
    results = list(done)
    remaining = sum(len(t[2]) for t in tasks)
    bar = progress(total=len(entries), desc=part, unit="img", initial=len(entries) - remaining)
    if tasks:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(eval_hashes,)) as pool:
            for stats, (_, _, chunk, _) in zip(pool.imap(_write_shard_task, tasks), tasks, strict=True):
                results.append(stats)
                bar.update(len(chunk))
    bar.close()
    results.sort(key=lambda r: r["shard"])
    manifest = {
        "part": part,
        "count": sum(r["count"] for r in results),
        "shards": [r["shard"] for r in results],
        "by_source": dict(sum((Counter(r["by_source"]) for r in results), Counter())),
        "skipped": dict(sum((Counter(r["skipped"]) for r in results), Counter())),
        "image_size": cfg.size,
        **extra,
    }
    if any("composition" in r for r in results):
        manifest["composition"] = merge_tallies(r.get("composition", {}) for r in results)
    atomic_json(root / "manifest.json", manifest)
    return manifest


def _part_hashes(out: Path, part: str) -> set[str]:
    hashes: set[str] = set()
    for sidecar in sorted((out / part).glob("*.json")):
        if sidecar.name != "manifest.json":
            hashes.update(json.loads(sidecar.read_text(encoding="utf-8")).get("image_sha1", []))
    return hashes


def build(out: Path, cfg: BuildConfig, paths: SourcePaths) -> dict[str, Any]:
    """Build (or finish building) the benchmark under ``out``; return the build summary (also build.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**asdict(cfg), "paths": {k: str(v) for k, v in asdict(paths).items()}, "format": BUILD_FORMAT}
    config = json.loads(json.dumps(config))
    record = out / "build.json"
    if record.exists():
        old = json.loads(record.read_text(encoding="utf-8"))["config"]
        changed = sorted(k for k in config if k not in ("workers", "paths") and old.get(k) != config[k])
        if changed:
            raise ValueError(f"{out} was built with a different config ({changed}); use a new directory")
    atomic_json(record, {"config": config, "complete": False})
    the_plan = plan(cfg, paths)
    manifests = write_plan(out, cfg, the_plan)
    summary = {"config": config, "complete": True, "parts": manifests, "measurements": the_plan.stats}
    atomic_json(record, summary)
    return summary


def write_plan(out: Path, cfg: BuildConfig, the_plan: Plan) -> dict[str, Any]:
    """Render and write every part of ``the_plan`` (eval suites first); return the manifests by part.

    Shards already written (tar plus its ``.json`` sidecar) are kept, so an interrupted build resumes.
    """
    manifests: dict[str, Any] = {}
    eval_parts = sorted(p for p in the_plan.parts if p.startswith("eval/"))
    for part in eval_parts:
        suite = the_plan.suites[part.split("/", 1)[1]]
        manifests[part] = _write_part(out, part, the_plan.parts[part], cfg, frozenset(), suite)
    eval_hashes = frozenset(h for part in eval_parts for h in _part_hashes(out, part))
    for part in ("pool", "curated"):
        manifests[part] = _write_part(out, part, the_plan.parts.get(part, []), cfg, eval_hashes, {})
    return manifests
