"""data.topcut: the exact top k by histogram passes equals keep_mask on the whole pool, ties and signs too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jestclip.data.topcut import key_value, order_keys, tie_quotas, top_cut
from jestclip.selection.filter import keep_count, keep_mask, score_threshold


def cut_mask(parts: list[np.ndarray], k: int) -> np.ndarray:
    """The keep mask the passes make, parts in pool order."""
    cut = top_cut(lambda: iter(parts), k)
    keys = [order_keys(p) for p in parts]
    quotas = tie_quotas([int((p == cut.key).sum()) for p in keys], cut.tied_kept)
    masks = []
    for part, quota in zip(keys, quotas, strict=True):
        tied = np.flatnonzero(part == cut.key)[:quota]
        mask = part > cut.key
        mask[tied] = True
        masks.append(mask)
    return np.concatenate(masks), cut


def test_order_keys_sort_as_the_floats():
    values = np.array([-np.inf, -2.5, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.5, 1.0, np.inf])
    keys = order_keys(values)
    assert (np.diff(keys.astype(object)) >= 0).all() and keys[4] == keys[5]  # -0.0 is 0.0
    assert [key_value(int(k)) for k in keys] == [float(v) + 0.0 for v in values]
    with pytest.raises(ValueError, match="NaN"):
        order_keys(np.array([0.1, np.nan]))


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([-1.0, -0.25, 0.0, 0.125, 0.3, 0.3000000000000001, 0.9]), min_size=1, max_size=60
    )
    | st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=60),
    keep=st.floats(0.01, 1.0),
    parts=st.integers(1, 5),
)
def test_the_cut_is_keep_masks_on_the_whole_pool(values, keep, parts):
    scores = np.array(values, dtype=np.float64)
    n = len(scores)
    if keep * n + 0.5 < 1:  # keeps none: refused by keep_count
        return
    k = keep_count(n, keep)
    bounds = sorted(np.random.default_rng(n).integers(0, n + 1, parts - 1).tolist())
    pieces = np.split(scores, bounds)
    mask, cut = cut_mask(pieces, k)
    expected = keep_mask(torch.from_numpy(scores), keep).numpy()
    assert (mask == expected).all()
    assert cut.threshold == score_threshold(torch.from_numpy(scores), keep)


def test_a_k_outside_the_pool_is_refused():
    with pytest.raises(ValueError, match="cannot keep the top 4 of 3"):
        top_cut(lambda: iter([np.zeros(3)]), 4)
    with pytest.raises(ValueError, match="tie counts disagree"):
        tie_quotas([1, 1], 3)
