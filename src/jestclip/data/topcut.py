"""The exact top k of a pool's scores without holding the pool: a radix select by histograms, in passes.

A static filter keeps the ``k = keep_count(N, Q)`` highest scores of a pool of N pairs, ties at the
threshold kept in pool order (``selection.filter.keep_mask``). At 10⁹ pairs no process should hold N scores,
so the threshold is found by counting: every float64 score maps to a uint64 key that sorts as the scores do
(``order_keys``); four passes over the scores, each counting the next 16 bits of the keys that share the
prefix found so far (a 65,536-bin histogram, summed over shards and ranks), pin down the exact key of the
k-th highest score (``top_cut``). Every pass reads the scores one shard at a time; ranks exchange only the
histograms. The count of scores above the threshold and of those tied at it then say how many of the tied
ones to keep, which the caller hands out in pool order (``tie_quotas``).

Radix select on floats by their bit patterns is the textbook way (e.g. Alabi et al., *Fast k-selection
algorithms for GPUs*, 2012, "radix select"); here it is exact to the last bit, so the cut is the one
``keep_mask`` makes on the whole pool at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Cut", "order_keys", "tie_quotas", "top_cut"]

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
_SIGN = np.uint64(1 << 63)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """``[n]`` uint64 keys that sort as the float64 ``scores`` do (``-0.0`` as ``0.0``); a ValueError for
    NaN. Positive floats get their sign bit set, negative ones all their bits flipped."""
    values = np.asarray(scores, dtype=np.float64) + 0.0  # -0.0 -> 0.0
    if np.isnan(values).any():
        raise ValueError("a filter score is NaN")
    bits = values.view(np.uint64)
    negative = (bits & _SIGN) != 0
    return np.where(negative, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float64 score whose ``order_keys`` key is ``key``."""
    bits = np.uint64(key)
    bits = bits & ~_SIGN if bits & _SIGN else ~bits
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


@dataclass(frozen=True)
class Cut:
    """The threshold of the top ``k``: its key and score (the lowest kept score), how many scores lie above
    it (all kept) and how many tied at it are kept (``k - above``)."""

    key: int
    threshold: float
    above: int
    tied_kept: int


def _histogram(keys: np.ndarray, prefix: int, depth: int) -> np.ndarray:
    """Counts of the ``depth``-th 16-bit digit of the keys whose first ``depth`` digits are ``prefix``."""
    shift = np.uint64(64 - DIGIT_BITS * (depth + 1))
    if depth:
        keys = keys[(keys >> np.uint64(64 - DIGIT_BITS * depth)) == np.uint64(prefix)]
    digits = ((keys >> shift) & np.uint64(BINS - 1)).astype(np.int64)
    return np.bincount(digits, minlength=BINS).astype(np.int64)


def top_cut(
    passes: Callable[[], Iterable[np.ndarray]],
    k: int,
    reduce: Callable[[np.ndarray], np.ndarray] = lambda counts: counts,
) -> Cut:
    """The cut of the ``k`` highest scores of a pool read by ``passes()``, which yields this process's
    scores (float64 arrays, e.g. one per shard) each time it is called; ``reduce`` sums a ``[BINS]`` int64
    histogram over processes (``torch.distributed.all_reduce``; the identity on one). Four passes. A
    ValueError when ``k`` is not in ``[1, N]``."""
    prefix, remaining, above = 0, k, 0
    for depth in range(64 // DIGIT_BITS):
        counts = np.zeros(BINS, np.int64)
        for scores in passes():
            counts += _histogram(order_keys(scores), prefix, depth)
        counts = reduce(counts)
        if depth == 0 and not 1 <= k <= int(counts.sum()):
            raise ValueError(f"cannot keep the top {k} of {int(counts.sum())} scores")
        from_top = np.cumsum(counts[::-1])
        index = int(np.searchsorted(from_top, remaining))  # first digit (from the top) reaching `remaining`
        digit = BINS - 1 - index
        higher = int(from_top[index] - counts[digit])
        above, remaining = above + higher, remaining - higher
        prefix = (prefix << DIGIT_BITS) | digit
    return Cut(key=prefix, threshold=key_value(prefix), above=above, tied_kept=remaining)


def tie_quotas(tied: Sequence[int], keep: int) -> list[int]:
    """How many of each part's scores tied at the threshold to keep, ``keep`` in all, the parts (shards) in
    pool order: the lowest pool indices first, as ``keep_mask`` keeps ties."""
    quotas, left = [], keep
    for count in tied:
        take = min(count, left)
        quotas.append(take)
        left -= take
    if left:
        raise ValueError(f"{left} tied scores to keep but none left: the tie counts disagree with the cut")
    return quotas
