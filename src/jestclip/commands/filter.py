"""``jestclip filter SHARDS --keep Q --out DIR``: a static reference-score filter (DataComp's CLIP score)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]

SCORES = ("similarity", "loss")  # jestclip.selection.filter.FILTER_SCORES (not imported: no torch for --help)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "filter",
        help="keep the pool pairs the cached reference scores best (static filter, DataComp's CLIP score)",
        description="Score every pair of the shards once from their cached reference embeddings "
        "(`jestclip cache-reference`), keep the best fraction Q of the whole pool and write a keep list "
        "into --out (keep.json, keep.keys.npy, filter.json). `jestclip train ... keep_list=DIR` then reads "
        "only the kept pairs (configs/filter.py). Under torchrun every rank scores its share of the shards "
        "(--score similarity) and no process holds more than one shard's scores.",
    )
    parser.add_argument("shards", nargs="+", help="shard paths, brace patterns or directories")
    parser.add_argument("--keep", type=_fraction, required=True, help="fraction Q of the whole pool to keep")
    parser.add_argument("--out", required=True, help="directory for the keep list (must not hold one)")
    parser.add_argument(
        "--score",
        choices=SCORES,
        default="similarity",
        help="similarity: the reference's image-text cosine (CLIP score); loss: minus the pair's contrastive "
        "loss against a seeded random batch of --batch-size pool pairs (penalises boilerplate captions)",
    )
    parser.add_argument(
        "--loss",
        default="sigmoid",
        choices=["sigmoid", "softmax"],
        help="--score loss: the reference's loss (sigmoid: SigLIP, softmax: CLIP)",
    )
    parser.add_argument("--batch-size", type=_positive, default=1024, help="--score loss: pairs per batch")
    parser.add_argument("--seed", type=int, default=0, help="--score loss: seed of the random batches")
    parser.add_argument(
        "--reference-cache", default="reference", help="name of the cached reference embeddings"
    )
    parser.add_argument("--fingerprint", help="the reference model the cache must hold (default: any)")
    parser.add_argument(
        "--skip-content-check",
        action="store_true",
        help="do not read every shard to check that its samples are those the cache embedded (the cache's "
        "digests are recorded as they are; training still checks each kept sample where it reads it): at "
        "scale this check reads the whole pool once more, as caching did",
    )
    parser.add_argument(
        "--cache-dir",
        help="the directory of the cached reference embeddings (as `jestclip cache-reference --cache-dir`; "
        "needed for shards behind a URL such as 'pipe:curl -s ...'; default: beside each shard)",
    )


def run(args: argparse.Namespace) -> int:
    from jestclip.commands.common import join_ranks
    from jestclip.data.keeplist import filter_shards

    ranks = join_ranks()  # under torchrun: every rank scores its shards (gloo)
    header = filter_shards(
        args.shards,
        args.out,
        keep=args.keep,
        score=args.score,
        loss=args.loss,
        batch_size=args.batch_size,
        seed=args.seed,
        name=args.reference_cache,
        fingerprint=args.fingerprint,
        cache_dir=args.cache_dir,
        check_content=not args.skip_content_check,
    )
    if ranks.is_main:
        print(json.dumps(header, indent=1))
        print(f"keep list: {args.out}")
    return 0
