"""What a reference-steered (DRRho-style) learner learned, read from its held-out features (docs/results.md,
Study II, "What the DRRho-style learner learned").

Every retrieval suite is encoded once by the reference and by each run's final model; then, per run, the
study's primary metric (gallery R@5, image→text and text→image, galleries of 100 pairs, averaged over the
suites as ``jestclip.eval.gallery_r5``) under four similarities of image i and caption j:

- ``learner``: ``x_i · y_j``, the run's own (what the study reports);
- ``reference``: ``x'_i · y'_j``;
- ``steered``: ``x_i · y_j − x'_i · y'_j``, the steered logit over the scale (what ``selection.steered_loss``
  trains): high when the learner learned a residual on top of the reference;
- ``sum``: ``x_i · y_j + x'_i · y'_j``, the two as an ensemble;

and the mean cosine of matched (``cos_pos``) and unmatched (``cos_neg``) pairs for the learner and the
reference, the correlation of the two models' cosines over matched (``corr_pos``) and over unmatched pairs
(``corr_neg``: a learner that confuses the captions the reference confuses scores high), and the learner's
logit scale and bias.

``--pool DIR --cache NAME`` reads the same statistics off a reference's cached embeddings of the *training*
pool (``jestclip cache-reference``'s sidecars, read through ``data.ReferenceCache``: beside the shards, or in
``--cache-dir``), galleries of 100 within each shard: how well the reference knows the very pairs a steered
learner must beat it on.

    python benchmarks/steering_probe.py runs/study2/drrho-natural-strong-s0 runs/study2/iid-natural-s0 \
        --reference runs/study2/ref-strong --data data/bench >> results/study2/steering-probe.jsonl
    python benchmarks/steering_probe.py --table results/study2/steering-probe.jsonl   # seeds as one row
    python benchmarks/steering_probe.py --pool data/bench/pool --cache study2-strong --shards 20
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from jestclip.data.loader import shard_files
from jestclip.data.refcache import ReferenceCache
from jestclip.eval import encode_suite, find_suites
from jestclip.eval.evaluate import GALLERY_SIZE, SuiteFeatures
from jestclip.eval.metrics import gallery_recall
from jestclip.models.factory import logit_params
from jestclip.train.trained import TrainedModel, load_trained

SIMILARITIES = ("learner", "reference", "steered", "sum")


def _pair(learner: SuiteFeatures, reference: SuiteFeatures, similarity: str) -> tuple[Tensor, Tensor]:
    """Image and text rows whose dot product is ``similarity`` (concatenating the two models' features:
    ``[x, x'] · [y, ±y'] = x·y ± x'·y'``)."""
    if similarity == "learner":
        return learner.image, learner.text
    if similarity == "reference":
        return reference.image, reference.text
    sign = -1.0 if similarity == "steered" else 1.0
    return (
        torch.cat([learner.image, reference.image], dim=1),
        torch.cat([learner.text, sign * reference.text], dim=1),
    )


def _cosines(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """The ``[n]`` matched and ``[n² − n]`` unmatched cosines of ``n`` normalised pairs."""
    sims = image @ text.T
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    return sims[eye], sims[~eye]


def probe(learner: Sequence[SuiteFeatures], reference: Sequence[SuiteFeatures], *, seed: int = 0) -> dict:
    """Gallery R@5 (%) under each of ``SIMILARITIES`` and the cosine statistics, pooled over suites.

    learner, reference: the two models' features of the same suites, in the same order (same rows); a
    ValueError when a suite's rows differ in number.
    """
    for a, r in zip(learner, reference, strict=True):
        if a.image.shape[0] != r.image.shape[0]:
            raise ValueError(f"steering probe: {a.image.shape[0]} learner rows against {r.image.shape[0]}")
    out: dict[str, float] = {}
    for similarity in SIMILARITIES:
        recalls = []
        for a, r in zip(learner, reference, strict=True):
            image, text = _pair(a, r, similarity)
            got = gallery_recall(image, text, a.concepts, size=GALLERY_SIZE, seed=seed)
            recalls += [got["i2t_r@5"], got["t2i_r@5"]]
        out[f"r5_{similarity}"] = 100 * sum(recalls) / len(recalls)
    matched: dict[str, list[Tensor]] = {"learner": [], "reference": []}
    unmatched: dict[str, list[Tensor]] = {"learner": [], "reference": []}
    for a, r in zip(learner, reference, strict=True):
        for name, f in (("learner", a), ("reference", r)):
            pos, neg = _cosines(f.image, f.text)
            matched[name].append(pos)
            unmatched[name].append(neg)
    for name in ("learner", "reference"):
        out[f"cos_pos_{name}"] = torch.cat(matched[name]).mean().item()
        out[f"cos_neg_{name}"] = torch.cat(unmatched[name]).mean().item()
    for key, sims in (("corr_pos", matched), ("corr_neg", unmatched)):
        both = torch.stack([torch.cat(sims["learner"]), torch.cat(sims["reference"])])
        out[key] = torch.corrcoef(both)[0, 1].item()
    return out


def cached_pair_stats(shards: Iterable[tuple[Tensor, Tensor]], *, seed: int = 0) -> dict[str, float]:
    """Gallery R@5 (%, galleries of ``GALLERY_SIZE`` within each shard) and the mean matched and unmatched
    cosine of a reference's cached embeddings, one ``(image [n, D], text [n, D])`` per shard (row i: pair
    i, as ``ReferenceCache.lookup`` returns them), pooled over the shards; ``shards`` and ``pairs`` count
    them. Rows
    are renormalised (the cache stores float16). A ValueError when there are none."""
    recalls, matched, unmatched, pairs, count = [], [], [], 0, 0
    for image, text in shards:
        count += 1
        image, text = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (image, text))
        n = image.shape[0]
        got = gallery_recall(image, text, torch.arange(n), size=GALLERY_SIZE, seed=seed)
        weight = max(1, n // GALLERY_SIZE)  # galleries in this shard
        recalls += [(got["i2t_r@5"] + got["t2i_r@5"]) / 2] * weight
        pos, neg = _cosines(image, text)
        matched.append(pos)
        unmatched.append(neg)
        pairs += n
    if not pairs:
        raise ValueError("steering probe: no cached embeddings to read")
    return {
        "shards": count,
        "pairs": pairs,
        "r5": 100 * sum(recalls) / len(recalls),
        "cos_pos": torch.cat(matched).mean().item(),
        "cos_neg": torch.cat(unmatched).mean().item(),
    }


def cached_shards(
    pool: str | Path, name: str, *, limit: int, cache_dir: str | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(image, text)`` of every cached pair of the first ``limit`` shards of ``pool``, a shard at a time
    (``ReferenceCache`` checks the sidecars: a missing or stale one is its one-line ValueError)."""
    urls = shard_files(pool)[:limit] if Path(pool).is_dir() else []  # every shard form the loader reads
    if not urls:
        raise ValueError(f"steering probe: no shards in {pool}")
    cache = ReferenceCache(urls, name=name, cache_dir=cache_dir)
    for i, url in enumerate(urls):
        keys = cache.keys(i)
        emb = cache.lookup(keys, [url] * len(keys), check_content=False)  # the cached rows as they are
        yield emb.image, emb.text


TABLE = (
    ("r5_learner", "R@5 learner (%)", 2),
    ("r5_steered", "R@5 learner − ref (%)", 2),
    ("r5_sum", "R@5 learner + ref (%)", 2),
    ("cos_pos_learner", "cos matched", 3),
    ("cos_neg_learner", "cos unmatched", 3),
    ("corr_neg", "corr. with ref, unmatched", 3),
    ("logit_scale", "logit scale", 2),
)


def table(rows: list[dict]) -> list[str]:
    """Markdown rows: the probe's rows (``main``'s JSON lines), runs that differ only in their ``-sN`` seed
    suffix as one row (mean ± sd over seeds), in first-seen order, then the reference's own line."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(re.sub(r"-s\d+$", "", Path(row["run"]).name), []).append(row)
    lines = [
        "| run | seeds | " + " | ".join(t for _, t, _ in TABLE) + " |",
        "|---|---:|" + "---:|" * len(TABLE),
    ]
    for name, runs in groups.items():
        cells = []
        for key, _, digits in TABLE:
            values = [r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.{digits}f}{spread}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    first = rows[0]
    lines.append(
        f"| reference | — | {first['r5_reference']:.2f} | — | — | {first['cos_pos_reference']:.3f} "
        f"| {first['cos_neg_reference']:.3f} | — | — |"
    )
    return lines


def encode(trained: TrainedModel, suites: list) -> list[SuiteFeatures]:
    return [
        encode_suite(trained.model, s, tokenize=trained.tokenize, transform=trained.transform) for s in suites
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="run directories (or weights files) to probe")
    parser.add_argument("--reference", help="the reference's run directory (or weights file)")
    parser.add_argument("--data", default="data/bench", help="benchmark root with the eval suites")
    parser.add_argument("--table", metavar="JSONL", help="print the seed-grouped table of earlier output")
    parser.add_argument("--pool", help="a training pool's shard directory: read its cached embeddings")
    parser.add_argument("--cache", help="with --pool: the reference cache's name")
    parser.add_argument("--shards", type=int, default=20, help="with --pool: the first N shards (default 20)")
    parser.add_argument(
        "--cache-dir", help="with --pool: where the sidecars are (default: beside the shards)"
    )
    args = parser.parse_args(argv)
    if args.pool:
        if not args.cache:
            parser.error("--pool needs --cache NAME")
        try:
            shards = cached_shards(args.pool, args.cache, limit=args.shards, cache_dir=args.cache_dir)
            row = cached_pair_stats(shards)
        except ValueError as exn:
            raise SystemExit(str(exn)) from None
        print(json.dumps({"pool": args.pool, "cache": args.cache, **row}), flush=True)
        return
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print("\n".join(table(rows)))
        return
    if not args.runs or not args.reference:
        parser.error("give the runs to probe and --reference (or --table JSONL)")
    suites = [s for s in find_suites(args.data) if any(t.startswith("retrieval") for t in s.tasks)]
    if not suites:
        raise SystemExit(f"steering probe: no retrieval suite under {args.data}")
    reference = encode(load_trained(args.reference), suites)
    for run in args.runs:
        trained = load_trained(run)
        scale, bias = logit_params(trained.model)
        row = probe(encode(trained, suites), reference)
        row.update(logit_scale=scale.item(), logit_bias=bias.item())
        print(json.dumps({"run": run, **{k: round(v, 3) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
