"""Ground-truth data quality of a sample: the one vocabulary the builder writes, the loader carries, the
training metrics count and the report tables.

A sample's JSON may hold ``"quality": {"clean": bool, "clean_caption": str | None, "noise": [kind, ...]}``:
``clean`` says whether the pair passes the curated filters as it stands (caption included), ``clean_caption``
is the caption the curated filters would give the drawing (None when they reject it), ``noise`` names every
kind of noise it carries, each one of ``NOISE_KINDS``. A pair can be unclean with no named kind (it fails a
filter no kind describes) and carry kinds while clean only if the kind does not fail the filters; writers
keep ``clean`` and ``noise`` consistent with their own filters (``quality_entry`` is the rule the benchmark
builder and ``jestclip data corrupt`` use: clean = a clean caption exists and no kind is named). Samples
without the entry are unlabelled: nothing is counted for them.

Each kind is borne by the caption (``CAPTION_KINDS``: it travels with the text when captions are swapped) or
by the image or the pair (the rest). docs/data.md has the table of kinds, with what the builder tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ALIAS_REPEAT",
    "BOILERPLATE_TITLE",
    "CAPTION_KINDS",
    "CLEAN",
    "FILENAME_TITLE",
    "GENERIC_KEYWORDS",
    "LEGACY_PREFIX",
    "MIME_TYPE",
    "NEAR_BLANK",
    "NOISE_KINDS",
    "NON_ENGLISH",
    "NUMBERED_NAME",
    "QUALITY_KEY",
    "RARE_NAME",
    "RAW_UNICODE_NAME",
    "SHORTNAME",
    "SKIN_TONE_REPEAT",
    "SWAPPED",
    "label_columns",
    "merge_tallies",
    "quality_entry",
    "quality_labels",
    "tally",
]

QUALITY_KEY = "quality"
CLEAN = "clean"

SWAPPED = "swapped"  # the caption was taken from another pair (``jestclip data corrupt``)
BOILERPLATE_TITLE = "boilerplate_title"  # OpenClipart: a title shared by many drawings ("gramastar", "card")
FILENAME_TITLE = "filename_title"  # OpenClipart: a title that looks like a file name ("BlueMan#107")
GENERIC_KEYWORDS = "generic_keywords"  # OpenClipart: no keyword beyond the generic ones ("hash", "unsorted")
NON_ENGLISH = "non_english"  # text not in English: OpenClipart text, icon names, TuxPaint captions
LEGACY_PREFIX = "legacy_prefix"  # icons: gtk-, stock_, gnome-, yast_ ... names
MIME_TYPE = "mime_type"  # icons: application-vnd.ms-excel, text-x-generic ...
NUMBERED_NAME = "numbered_name"  # icons: a name ending in a number (nm-vpn-connecting06, battery-080)
RARE_NAME = "rare_name"  # icons: a name too few themes share to be a semantic name (feathernotes)
ALIAS_REPEAT = "alias_repeat"  # icons: the drawing again, under another of its names
RAW_UNICODE_NAME = "raw_unicode_name"  # emoji: Unicode character names that are not the CLDR name
SHORTNAME = "shortname"  # emoji: an EmojiOne shortname that is not the CLDR name (":flag_gb:")
SKIN_TONE_REPEAT = "skin_tone_repeat"  # emoji: a skin-tone variant of one concept
NEAR_BLANK = "near_blank"  # the render is (almost) empty

# Every named kind of noise, in the order of the label columns after ``clean``.
NOISE_KINDS: tuple[str, ...] = (
    SWAPPED,
    BOILERPLATE_TITLE,
    FILENAME_TITLE,
    GENERIC_KEYWORDS,
    NON_ENGLISH,
    LEGACY_PREFIX,
    MIME_TYPE,
    NUMBERED_NAME,
    RARE_NAME,
    ALIAS_REPEAT,
    RAW_UNICODE_NAME,
    SHORTNAME,
    SKIN_TONE_REPEAT,
    NEAR_BLANK,
)

# The kinds that describe the caption's text: every kind but those of the image (near_blank, skin_tone_repeat,
# alias_repeat: the image is a repeat of another pool image) and of the pairing (swapped).
CAPTION_KINDS: frozenset[str] = frozenset(NOISE_KINDS) - {NEAR_BLANK, SKIN_TONE_REPEAT, ALIAS_REPEAT, SWAPPED}


def label_columns() -> tuple[str, ...]:
    """Names of the columns of ``quality_labels``: ``clean``, then every kind of ``NOISE_KINDS``."""
    return (CLEAN, *NOISE_KINDS)


def quality_entry(clean_caption: str | None, noise: Iterable[str]) -> dict[str, Any]:
    """The ``quality`` entry of a pair: ``clean`` when a clean caption exists and no kind is named.

    ``noise`` is deduplicated and put in ``NOISE_KINDS`` order. Raises ValueError naming an unknown kind.
    """
    kinds = set(noise)
    unknown = sorted(kinds - set(NOISE_KINDS))
    if unknown:
        raise ValueError(f"unknown noise kind(s) {unknown}; choose from {NOISE_KINDS}")
    ordered = [k for k in NOISE_KINDS if k in kinds]
    clean = clean_caption is not None and not ordered
    return {CLEAN: clean, "clean_caption": clean_caption, "noise": ordered}


def tally(meta: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Count samples by quality: ``{group: {"pairs", "labelled", "clean", "unclean_unnamed", kind, ...}}``.

    Groups are ``"all"`` and each metadata ``source`` (``"?"`` when absent); ``pairs`` counts every sample,
    the rest only those with a ``quality`` entry; ``unclean_unnamed`` counts unclean samples with no named
    kind; a kind appears once some sample carries it. ``merge_tallies`` sums the tallies of several shards.
    """
    counts: dict[str, Counter[str]] = {"all": Counter()}
    for m in meta:
        groups = (counts["all"], counts.setdefault(str(m.get("source", "?")), Counter()))
        entry = m.get(QUALITY_KEY)
        for c in groups:
            c["pairs"] += 1
            if isinstance(entry, dict):
                c["labelled"] += 1
                c[CLEAN] += bool(entry.get(CLEAN))
                c["unclean_unnamed"] += not entry.get(CLEAN) and not entry.get("noise")
                c.update(entry.get("noise", []))
    return _grouped(counts)


def merge_tallies(tallies: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """The sum of several ``tally`` results (group by group, count by count)."""
    total: dict[str, Counter[str]] = {}
    for t in tallies:
        for group, counts in t.items():
            total.setdefault(group, Counter()).update(counts)
    return _grouped(total)


def _grouped(counts: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    """ "all" first, then the sources by name; in each, the head counts, then the kinds carried."""
    head = ["pairs", "labelled", CLEAN, "unclean_unnamed"]
    groups = sorted(counts, key=lambda g: (g != "all", g))
    return {
        g: {k: counts[g][k] for k in head} | {k: counts[g][k] for k in NOISE_KINDS if counts[g][k]}
        for g in groups
    }


def quality_labels(meta: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor] | None:
    """Ground-truth labels of a batch's samples from their JSON metadata.

    Returns ``(labels, known)``: ``labels`` a ``[B, 1 + K]`` bool tensor, column 0 ``clean`` and column
    ``1 + k`` noise kind ``NOISE_KINDS[k]``; ``known`` a ``[B]`` bool tensor, whether sample i carries a
    ``quality`` entry (rows of unlabelled samples are all False). None when no sample carries one.

    Raises ValueError naming the sample's key (``__key__`` in its metadata, else its index) when an entry is
    malformed or names an unknown kind.
    """
    if not any(QUALITY_KEY in m for m in meta):
        return None
    width = 1 + len(NOISE_KINDS)
    known = [QUALITY_KEY in m for m in meta]
    marked: list[int] = []  # flat positions i * width + column of the set labels: one tensor write at the end
    column = {kind: 1 + k for k, kind in enumerate(NOISE_KINDS)}
    for i, m in enumerate(meta):
        if not known[i]:
            continue
        entry = m[QUALITY_KEY]
        if not isinstance(entry, dict) or not isinstance(entry.get(CLEAN), bool):
            where = f"sample {m.get('__key__', i)!r}"
            raise ValueError(f"{where}: 'quality' must be an object with a bool 'clean', got {entry!r}")
        kinds = entry.get("noise", [])
        if not isinstance(kinds, list) or not all(k in column for k in kinds):
            where = f"sample {m.get('__key__', i)!r}"
            raise ValueError(f"{where}: 'quality.noise' must list kinds from {NOISE_KINDS}, got {kinds!r}")
        if entry[CLEAN]:
            marked.append(i * width)
        marked.extend(i * width + column[k] for k in kinds)
    labels = torch.zeros(len(meta) * width, dtype=torch.bool)
    labels[torch.tensor(marked, dtype=torch.long)] = True
    return labels.view(len(meta), width), torch.tensor(known, dtype=torch.bool)
