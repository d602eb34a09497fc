"""Ground-truth data quality of a sample: the one vocabulary the builder writes, the loader carries, the
training metrics count and the report tables.

A sample's JSON may hold ``"quality": {"clean": bool, "clean_caption": str | None, "noise": [kind, ...]}``:
``clean`` says whether the pair passes the curated filters as it stands (caption included), ``clean_caption``
is the caption the curated filters would give the drawing (None when they reject it), ``noise`` names every
kind of noise it carries, each one of ``NOISE_KINDS``. A pair can be unclean with no named kind (it fails a
filter no kind describes) and carry kinds while clean only if the kind does not fail the filters; writers
keep ``clean`` and ``noise`` consistent with their own filters. Samples without the entry are unlabelled:
nothing is counted for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CLEAN", "NOISE_KINDS", "QUALITY_KEY", "SWAPPED", "label_columns", "quality_labels"]

QUALITY_KEY = "quality"
CLEAN = "clean"
SWAPPED = "swapped"  # the caption was taken from another pair (``jestclip data corrupt``)

# Every named kind of noise, in the order of the label columns after ``clean``.
NOISE_KINDS: tuple[str, ...] = (
    SWAPPED,
    "boilerplate_title",  # OpenClipart: a title shared by many drawings ("gramastar", "card")
    "filename_title",  # OpenClipart: a title that looks like a file name ("BlueMan#107", "Tigre01")
    "generic_keywords",  # OpenClipart: no keyword beyond the generic ones ("hash", "unsorted")
    "non_english",  # text not in English (OpenClipart titles, icon names)
    "legacy_prefix",  # icons: gtk-, stock_, gnome-, yast_ ... names
    "mime_type",  # icons: application-vnd.ms-excel, text-x-generic ...
    "animation_frame",  # icons: numbered frames (nm-vpn-connecting06)
    "alias_repeat",  # icons: one drawing under another of its names
    "raw_unicode_name",  # emoji: the upper-case Unicode character name
    "skin_tone_repeat",  # emoji: a skin-tone variant of one concept
    "foreign_language",  # TuxPaint: the stamp's caption in a random non-English language
    "near_blank",  # the render is (almost) empty
)


def label_columns() -> tuple[str, ...]:
    """Names of the columns of ``quality_labels``: ``clean``, then every kind of ``NOISE_KINDS``."""
    return (CLEAN, *NOISE_KINDS)


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
