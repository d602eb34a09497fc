"""Check a reference before using it, from its cached embeddings of your shards, writing nothing.

Whether JEST, a static filter or a DRRho-style loss gains anything from a reference depends on two things
Study II measured (docs/studies/study2.md):

- **Does it tell a pair's own caption from another image's?** Half of a sample of the pool's pairs are given
  another pair's caption, as ``jestclip data corrupt --swap-captions 0.5`` would (``data.swaps.swap_plan``,
  the same plan; a cached caption embedding is the caption's, so a swap is a row exchange), the reference
  scores every pair as ``jestclip filter`` does, and the check counts the swapped pairs among the top half
  kept. Study II: a reference trained on the clean pool kept 12.6% of them (of 50% offered) and made JEST end
  6.5 points above IID on a pool with half its captions swapped; one trained on 6k curated pairs kept 42.2%.
- **Did it train on this pool?** Gallery R@5 (galleries of 100 within each shard, each pair its own match)
  on the pool's own pairs against the same measure on held-out pairs: a reference that knows its training
  pairs far better than held-out ones sets margins a steered learner cannot beat. Study II: 68.7% on the
  pool against 17.5% held out, and DRRho with it ended below IID on both pools; a reference that never saw the
  pool read 16.1% against 21.0% and made DRRho level with or above IID (one seed).

``check_reference`` measures both on a seeded sample of shards; ``ReferenceCheck.verdicts`` says what they
mean for each method, with the numbers they rest on. The thresholds (``SEPARATES``, ``BLIND``,
``MEMORISED``) sit between Study II's measured references; they are rules of thumb from one benchmark.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from jestclip.data.loader import expand_urls
from jestclip.data.refcache import ReferenceCache
from jestclip.data.swaps import swap_plan
from jestclip.eval.metrics import gallery_recall
from jestclip.selection import Embeddings
from jestclip.selection.filter import keep_mask, reference_scores

__all__ = [
    "BLIND",
    "MEMORISED",
    "SEPARATES",
    "ReferenceCheck",
    "cached_pairs",
    "check_reference",
    "pool_recall",
]

GALLERY = 100  # pairs per gallery, as the eval suites' ``gallery:`` metrics
SEPARATES = 0.5  # swapped share kept at most this fraction of the share offered: it tells captions apart
BLIND = 0.8  # at least this fraction of the share offered: it barely does (Study II: 12.6% and 42.2% of 50%)
MEMORISED = 1.5  # pool R@5 over held-out R@5 above this: it trained on the pool (Study II: 3.9x and 0.76x)


@dataclass(frozen=True)
class ReferenceCheck:
    """What ``check_reference`` measured (shares are fractions, recalls percent)."""

    cache: str
    model: str
    shards: int  # shards read
    pairs: int  # cached pairs read
    swap: float  # share of the sample given another pair's caption
    keep: float  # share kept by the filter the swap test applies
    score: str  # the filter's score ("similarity": the CLIP score, or "loss")
    swapped_kept: float  # share of swapped pairs among the kept
    pool_r5: float  # gallery R@5 (%) on the pool's own pairs
    held_out_r5: float | None  # the same on held-out pairs (None: not given)
    held_out: str | None  # where the held-out figure comes from

    @property
    def memorisation(self) -> float | None:
        """Pool R@5 over held-out R@5 (None without a held-out figure)."""
        if self.held_out_r5 is None or self.held_out_r5 <= 0:
            return None
        return self.pool_r5 / self.held_out_r5

    def verdicts(self) -> dict[str, str]:
        """One line per method (JEST, filter, DRRho): what the measurements mean for it."""
        kept, offered = f"{100 * self.swapped_kept:.1f}%", f"{100 * self.swap:.0f}%"
        ratio = self.swapped_kept / self.swap if self.swap else 1.0
        tells = f"it keeps {kept} swapped pairs in its top {100 * self.keep:.0f}% (of {offered} offered)"
        if ratio <= SEPARATES:
            jest = f"use it: {tells}, so its learnability term ranks wrong captions low"
            filt = f"use it: {tells}"
        elif ratio >= BLIND:
            jest = f"little to gain from it: {tells}; it barely tells a pair's caption from another image's"
            filt = f"little to gain from it: {tells}; it drops about as many right captions as wrong ones"
        else:
            jest = f"some gain expected: {tells}"
            filt = f"some gain expected: {tells}"
        memorised = self.memorisation
        if memorised is None:
            drrho = (
                f"not judged: R@5 {self.pool_r5:.1f}% on the pool's own pairs, no held-out figure "
                "(give held-out shards cached by the same reference, or the reference's run)"
            )
        elif memorised > MEMORISED:
            drrho = (
                f"do not steer with it: R@5 {self.pool_r5:.1f}% on the pool's own pairs against "
                f"{self.held_out_r5:.1f}% held out ({memorised:.1f}x): it trained on this pool, and a "
                "steered learner cannot beat its margins there"
            )
        else:
            drrho = (
                f"can steer: R@5 {self.pool_r5:.1f}% on the pool's own pairs against {self.held_out_r5:.1f}% "
                f"held out ({memorised:.2f}x): it does not know these pairs better than unseen ones"
            )
        return {"jest": jest, "filter": filt, "drrho": drrho}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memorisation": self.memorisation, "verdicts": self.verdicts()}


def cached_pairs(cache: ReferenceCache, shard: int) -> Embeddings:
    """Every cached pair of shard ``shard`` (an index into ``cache.urls``), float32, in the cache's order."""
    keys = cache.keys(shard)
    return cache.lookup(keys, [cache.urls[shard]] * len(keys))


def pool_recall(shards: Sequence[Embeddings], *, seed: int = 0) -> float:
    """Gallery R@5 (%, image→text and text→image averaged) within galleries of ``GALLERY`` pairs drawn inside
    each shard, each pair its own match, averaged over the galleries of all ``shards``. A ValueError when
    there are no pairs."""
    recalls: list[float] = []
    for emb in shards:
        n = emb.image.shape[0]
        if n == 0:
            continue
        image, text = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (emb.image, emb.text))
        got = gallery_recall(image, text, torch.arange(n), size=GALLERY, seed=seed)
        recalls += [(got["i2t_r@5"] + got["t2i_r@5"]) / 2] * max(1, n // GALLERY)
    if not recalls:
        raise ValueError("no cached pairs to measure")
    return 100 * statistics.fmean(recalls)


def swapped_share_kept(
    pairs: Embeddings,
    *,
    swap: float,
    keep: float,
    seed: int,
    score: str = "similarity",
    loss: str = "sigmoid",
) -> float:
    """The share of swapped pairs among those a filter keeps, after a ``swap`` share of ``pairs`` took another
    pair's caption (``swap_plan``: identical caption embeddings count as the same caption, as identical
    texts do for ``jestclip data corrupt``). ``score``, ``loss``: the filter's (``reference_scores``)."""
    texts = [row.numpy().tobytes() for row in pairs.text]
    donors = swap_plan(texts, swap, seed)
    receivers = torch.tensor(sorted(donors), dtype=torch.long)
    text = pairs.text.clone()
    text[receivers] = pairs.text[torch.tensor([donors[int(i)] for i in receivers], dtype=torch.long)]
    swapped = Embeddings(pairs.image, text, pairs.scale, pairs.bias)
    scores = reference_scores(swapped.take, len(texts), score=score, loss=loss, seed=seed)
    kept = keep_mask(scores, keep)
    is_swapped = torch.zeros(len(texts), dtype=torch.bool)
    is_swapped[receivers] = True
    return float(is_swapped[kept].float().mean())


def check_reference(
    shards: str | Path | Sequence[str | Path],
    *,
    name: str = "reference",
    cache_dir: str | Path | None = None,
    sample: int | None = 100,
    swap: float = 0.5,
    keep: float = 0.5,
    score: str = "similarity",
    seed: int = 0,
    held_out: str | Path | Sequence[str | Path] | None = None,
    held_out_cache_dir: str | Path | None = None,
    held_out_r5: float | None = None,
    held_out_source: str | None = None,
) -> ReferenceCheck:
    """Measure a reference from its cached embeddings ``name`` of ``shards`` (module docstring).

    sample: shards read, drawn with ``random.Random(seed)`` when there are more (None: all); their pairs are
    the swap test's pool. held_out: shards cached by the same reference (its fingerprint checked), measured
    the same way; or held_out_r5: the reference's own held-out gallery R@5 (%), e.g. its run's final
    ``eval/gallery_r5``, named by held_out_source. A ValueError (one line) for a missing, stale or foreign
    cache, as ``ReferenceCache``.
    """
    urls = expand_urls(shards)
    if sample is not None and len(urls) > sample:
        urls = sorted(random.Random(seed).sample(urls, sample), key=urls.index)
    cache = ReferenceCache(urls, name=name, cache_dir=cache_dir)
    pools = [cached_pairs(cache, i) for i in range(len(urls))]
    pairs = Embeddings(
        torch.cat([p.image for p in pools]),
        torch.cat([p.text for p in pools]),
        cache.meta.scale,
        cache.meta.bias,
    )
    kept = swapped_share_kept(pairs, swap=swap, keep=keep, seed=seed, score=score)
    if held_out is not None:
        other = ReferenceCache(
            held_out, name=name, cache_dir=held_out_cache_dir, fingerprint=cache.meta.fingerprint
        )
        held_out_r5 = pool_recall([cached_pairs(other, i) for i in range(len(other.urls))], seed=seed)
        held_out_source = f"{len(other.urls)} held-out shards"
    return ReferenceCheck(
        cache=name,
        model=cache.meta.model,
        shards=len(urls),
        pairs=pairs.image.shape[0],
        swap=swap,
        keep=keep,
        score=score,
        swapped_kept=kept,
        pool_r5=pool_recall(pools, seed=seed),
        held_out_r5=held_out_r5,
        held_out=held_out_source if held_out_r5 is not None else None,
    )
