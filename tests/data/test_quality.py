"""The ground-truth quality vocabulary (data/quality.py)."""

import pytest
import torch

from jestclip.data.quality import NOISE_KINDS, label_columns, quality_labels


def test_no_quality_entries_gives_none():
    assert quality_labels([{"source": "emoji"}, {}]) is None


def test_labels_and_known_rows():
    meta = [
        {"quality": {"clean": True, "clean_caption": "cat", "noise": []}},
        {"source": "x"},
        {"quality": {"clean": False, "clean_caption": None, "noise": ["swapped", "near_blank"]}},
    ]
    labels, known = quality_labels(meta)
    assert known.tolist() == [True, False, True]
    cols = label_columns()
    assert labels.shape == (3, 1 + len(NOISE_KINDS))
    assert labels[0].tolist() == [c == "clean" for c in cols]
    assert not labels[1].any()
    assert labels[2].tolist() == [c in ("swapped", "near_blank") for c in cols]
    assert labels.dtype == torch.bool


@pytest.mark.parametrize(
    "entry",
    [
        {"noise": []},
        {"clean": "yes"},
        {"clean": False, "noise": ["mystery"]},
        {"clean": True, "noise": "x"},
        3,
    ],
)
def test_malformed_entries_name_the_sample(entry):
    with pytest.raises(ValueError, match="'k1'"):
        quality_labels([{"__key__": "k1", "quality": entry}])


def test_quality_entry_orders_kinds_and_is_clean_only_without_noise():
    from jestclip.data.quality import quality_entry

    assert quality_entry("a cat", []) == {"clean": True, "clean_caption": "a cat", "noise": []}
    assert quality_entry(None, []) == {"clean": False, "clean_caption": None, "noise": []}
    noisy = quality_entry("a cat", ["near_blank", "swapped", "near_blank"])
    assert noisy == {"clean": False, "clean_caption": "a cat", "noise": ["swapped", "near_blank"]}
    with pytest.raises(ValueError, match="'mystery'"):
        quality_entry("a cat", ["mystery"])


def test_caption_kinds_are_noise_kinds_and_exclude_what_the_image_carries():
    from jestclip.data.quality import CAPTION_KINDS

    assert CAPTION_KINDS < set(NOISE_KINDS)
    assert set(NOISE_KINDS) - CAPTION_KINDS == {"swapped", "alias_repeat", "skin_tone_repeat", "near_blank"}


def test_tally_counts_by_source_and_merges():
    from jestclip.data.quality import merge_tallies, tally

    meta = [
        {"source": "emoji", "quality": {"clean": True, "clean_caption": "x", "noise": []}},
        {"source": "emoji", "quality": {"clean": False, "clean_caption": None, "noise": []}},
        {
            "source": "icons",
            "quality": {"clean": False, "clean_caption": None, "noise": ["mime_type", "rare_name"]},
        },
        {"source": "icons"},
    ]
    head = ["pairs", "labelled", "clean", "unclean_unnamed"]
    one = tally(meta)
    assert list(one) == ["all", "emoji", "icons"]
    assert one["all"] == dict(zip(head, [4, 3, 1, 1], strict=True)) | {"mime_type": 1, "rare_name": 1}
    assert one["emoji"] == dict(zip(head, [2, 2, 1, 1], strict=True))
    assert one["icons"] == dict(zip(head, [2, 1, 0, 0], strict=True)) | {"mime_type": 1, "rare_name": 1}
    both = merge_tallies([one, tally(meta[2:3])])
    assert both["icons"] == dict(zip(head, [3, 2, 0, 0], strict=True)) | {"mime_type": 2, "rare_name": 2}
    assert both["all"]["pairs"] == 5 and list(both) == ["all", "emoji", "icons"]
