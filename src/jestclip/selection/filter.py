"""Static reference-score filtering: score every pair of a pool once with the reference, keep the best.

This is DataComp's CLIP-score filter (Gadre et al., *DataComp: In search of the next generation of
multimodal datasets*, arXiv 2304.14108, baseline "CLIP score"; code: ``baselines/apply_filter.py``,
``get_threshold``): a keep fraction Q of the whole pool becomes one score threshold, and the pairs at or
above it are kept, once, before training. JEST's "easy reference" scoring is its online, per-super-batch
counterpart (Evans et al. 2024, section 3): ``independent_scores(None, ref, scoring="easy_reference")`` is
a monotone function of the cosine below, so a top-k of it keeps the same pairs.

Notation as in ``contrastive.py``: ``x_k``, ``y_k`` the reference's L2-normalised image and text embeddings
of pair k, ``L_ij = scale · x_i·y_j (+ bias for sigmoid)`` with the reference's own ``scale`` and ``bias``.

Scores (higher = keep):

- ``similarity``: the CLIP score ``x_k·y_k``, a cosine in [-1, 1].
- ``loss``: minus the pair's contrastive loss in nats, ``-ℓ_k(S)``, against the other pairs of a batch S of
  ``batch_size`` drawn from the pool at random with a fixed seed (``loss_batches``). For one pair alone the
  positive term ``softplus(-L_kk)`` (sigmoid) or ``-L_kk`` (softmax) is monotone in the cosine and would rank
  as ``similarity`` does; the negatives make the difference: a caption that matches many images (boilerplate)
  or an image that matches many captions has a high loss however well it matches its own partner.

  sigmoid: ``ℓ_k(S) = softplus(-L_kk) + Σ_{j∈S, j≠k} [softplus(L_kj) + softplus(L_jk)]``, the pair's row
  (image k against the other texts) and column (text k against the other images) of SigLIP's pair losses;
  softmax: ``ℓ_k(S) = -L_kk + ½ (LSE_{j∈S} L_kj + LSE_{j∈S} L_jk)``, the pair's image-to-text and
  text-to-image cross-entropy terms of CLIP's loss (``c_k`` of Algorithm 3 with S containing k).

Keeping: ``keep_count(n, keep)`` = ``⌊Q·N + ½⌋`` pairs exactly (Q·N rounded half up), the highest scores;
pairs tied at the threshold are kept in pool order (lowest index first) until the count is reached, so the
kept set never exceeds the count and does not depend on the sort's tie order. ``score_threshold`` is the
lowest kept score: every pair above it is kept, every pair below it dropped. (DataComp's threshold is the
``(⌊Q·N⌋ + 1)``-th largest score and it keeps every pair at or above it: one more than ``⌊Q·N⌋``, more on
ties.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from jestclip.selection.checks import full_precision
from jestclip.selection.contrastive import LOSSES, SigmoidTerms, running_terms
from jestclip.selection.embeddings import Embeddings

__all__ = [
    "FILTER_SCORES",
    "clip_scores",
    "keep_count",
    "keep_mask",
    "loss_batches",
    "pair_losses",
    "reference_scores",
    "score_threshold",
]

FILTER_SCORES: tuple[str, ...] = ("similarity", "loss")
# rows scored at a time by the similarity pass of ``reference_scores``
SIMILARITY_BLOCK = 1 << 16


@full_precision
def clip_scores(reference: Embeddings) -> Tensor:
    """``[n]`` CLIP scores ``x_k·y_k`` (cosines in [-1, 1]) in ``reference.compute_dtype``."""
    dtype = reference.compute_dtype
    return (reference.image.to(dtype) * reference.text.to(dtype)).sum(dim=1)


@full_precision
def pair_losses(batch: Embeddings, loss: str = "sigmoid") -> Tensor:
    """``[n]`` each pair's contrastive loss ``ℓ_k(S)`` in nats against the other pairs of ``batch`` (S, all
    of its n pairs), row and column (formulas in the module docstring), in ``batch.compute_dtype``. Memory
    O(n) plus one logit tile (``contrastive.MAX_TILE_ELEMENTS``): no ``[n, n]`` tensor is built.

    A ValueError names an unknown ``loss``.
    """
    if loss not in LOSSES:
        raise ValueError(f"pair_losses: loss must be one of {LOSSES}, got {loss!r}")
    terms = running_terms(batch, loss)
    terms.absorb(batch.image, batch.text)
    if isinstance(terms, SigmoidTerms):
        # row and col counted the pair itself with the off-diagonal formula softplus(L_kk), once each
        return terms.conditional() - 2.0 * F.softplus(terms.self_logit)
    return terms.in_context()


def loss_batches(n: int, batch_size: int, *, seed: int) -> Tensor:
    """``[ceil(n / b), b]`` pool indices: the batches the ``loss`` score draws, ``b = min(batch_size, n)``.

    ``π = torch.randperm(n)`` from a CPU generator seeded with ``seed``; batch t holds
    ``π[(t·b + i) mod n]`` for i < b, so every batch has exactly b pairs (the last one wraps around to the
    start of π) and pair ``π[m]`` is scored in batch ``⌊m / b⌋``, at position ``m mod b``: the first
    ``min(b, n - t·b)`` positions of batch t are the pairs it scores. A ValueError for n < 1 or b < 1.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"loss_batches: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    b = min(batch_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(math.ceil(n / b) * b) % n
    return perm[positions].view(-1, b)


def reference_scores(
    fetch: Callable[[Tensor], Embeddings],
    n: int,
    *,
    score: str = "similarity",
    loss: str = "sigmoid",
    batch_size: int = 1024,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """``[n]`` float64 filter scores of a pool of n pairs (higher = keep; module docstring).

    fetch: ``fetch(indices [m]) -> Embeddings`` of those pool pairs, in that order (``emb.take`` for a
    pool in memory, a ``ReferenceCache.lookup`` for shards). score="similarity" fetches each pair once, in
    blocks of consecutive indices; score="loss" fetches the ``loss_batches(n, batch_size, seed=seed)``, each
    pair once plus the last batch's wrap-around. ``progress(rows)`` is called with the pairs scored by each
    fetch. A ValueError names an unknown ``score`` or ``loss``, or a fetch of the wrong size.
    """
    if score not in FILTER_SCORES:
        raise ValueError(f"reference_scores: score must be one of {FILTER_SCORES}, got {score!r}")
    if loss not in LOSSES:
        raise ValueError(f"reference_scores: loss must be one of {LOSSES}, got {loss!r}")
    out = torch.empty(n, dtype=torch.float64)

    def fetched(indices: Tensor) -> Embeddings:
        emb = fetch(indices)
        if emb.n != len(indices):
            raise ValueError(f"reference_scores: fetch returned {emb.n} pairs for {len(indices)} indices")
        return emb

    if score == "similarity":
        for start in range(0, n, SIMILARITY_BLOCK):
            indices = torch.arange(start, min(n, start + SIMILARITY_BLOCK))
            out[indices] = clip_scores(fetched(indices)).double().cpu()
            if progress is not None:
                progress(len(indices))
        return out
    batches = loss_batches(n, batch_size, seed=seed)
    b = batches.shape[1]
    for t, indices in enumerate(batches):
        anchors = min(b, n - t * b)
        out[indices[:anchors]] = -pair_losses(fetched(indices), loss)[:anchors].double().cpu()
        if progress is not None:
            progress(anchors)
    return out


def keep_count(n: int, keep: float) -> int:
    """Pairs kept of n at keep fraction Q of the pool: ``⌊Q·n + ½⌋``; a ValueError unless 0 < Q <= 1 and at
    least one pair is kept."""
    if isinstance(keep, bool) or not (isinstance(keep, int | float) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep fraction must be in (0, 1], got {keep!r}")
    count = math.floor(keep * n + 0.5)
    if count < 1:
        raise ValueError(f"keep fraction {keep:g} of {n} pairs keeps none")
    return count


def _top(scores: Tensor, keep: float) -> Tensor:
    """Indices of the ``keep_count`` highest scores, ties in index order (a stable descending sort)."""
    if scores.ndim != 1 or not scores.is_floating_point():
        shape = tuple(scores.shape)
        raise ValueError(f"scores must be a 1-D floating-point tensor, got {scores.dtype} {shape}")
    bad = torch.nonzero(~torch.isfinite(scores)).flatten()
    if bad.numel():
        first = int(bad[0])
        raise ValueError(f"{bad.numel()} of {scores.numel()} scores are not finite (first index {first})")
    count = keep_count(scores.numel(), keep)
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def score_threshold(scores: Tensor, keep: float) -> float:
    """DataComp's ``get_threshold``: the lowest score kept at keep fraction ``keep`` of the pool (the
    ``keep_count``-th largest of the ``[N]`` ``scores``), in the scores' units. ValueError for non-finite
    scores or a fraction that keeps nothing."""
    return float(scores[_top(scores, keep)[-1]])


def keep_mask(scores: Tensor, keep: float) -> Tensor:
    """``[N]`` bool: exactly ``keep_count(N, keep)`` pairs kept, the highest ``scores``, ties at
    ``score_threshold`` kept lowest index first. ValueError as ``score_threshold``."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[_top(scores, keep)] = True
    return mask
