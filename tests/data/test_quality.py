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
