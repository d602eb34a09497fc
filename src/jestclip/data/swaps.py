"""Which pairs of a pool swap captions, and with whom: the noise dial's plan (``benchmark.corrupt`` writes a
pool by it; ``report.check`` applies it to cached embeddings, writing nothing)."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence

__all__ = ["swap_plan"]


def swap_plan(texts: Sequence[Hashable], swap_captions: float, seed: int) -> dict[int, int]:
    """Which pair takes which pair's caption: ``{receiver index: donor index}`` over ``len(texts)`` pairs.

    ``k = floor(swap_captions * N + 0.5)`` receivers, drawn with ``random.Random(seed)``; donors are the
    receivers themselves (a derangement: no receiver is its own donor, and no donor's text equals the
    receiver's own text). Raises ValueError when ``swap_captions`` is outside [0, 1], when ``k`` is 1 (one
    pair cannot swap), or when the drawn pairs' texts leave no such derangement.
    """
    if not 0.0 <= swap_captions <= 1.0:  # also rejects NaN
        raise ValueError(f"swap_captions must be in [0, 1], got {swap_captions}")
    n = len(texts)
    k = math.floor(swap_captions * n + 0.5)
    if k == 0:
        return {}
    if k == 1:
        raise ValueError(f"swap_captions {swap_captions} of {n} pairs is 1 pair, and one pair cannot swap")
    rng = random.Random(seed)
    order = rng.sample(range(n), k)
    donor = {order[t]: order[(t + 1) % k] for t in range(k)}
    # exchange donors until no receiver gets its own text: i and j swap donors when both then differ
    for i in order:
        if texts[donor[i]] != texts[i]:
            continue
        start = rng.randrange(k)
        for j in (order[(start + t) % k] for t in range(k)):
            if texts[donor[j]] != texts[i] and texts[donor[i]] != texts[j]:
                donor[i], donor[j] = donor[j], donor[i]
                break
        else:
            raise ValueError(
                f"cannot swap {k} captions so that none keeps its own text: too few distinct captions"
            )
    return donor
