"""``jestclip check-reference SHARDS --reference-cache NAME``: will this reference help JEST, a filter or
DRRho on these shards? Measured from its cached embeddings, writing nothing (``jestclip.report.check``)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1)")
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
        "check-reference",
        help="will a cached reference help JEST, the filter or DRRho on these shards? (writes nothing)",
        description=(
            "From the reference's cached embeddings of your shards (`jestclip cache-reference`): give "
            "half of a sample of pairs another pair's caption (arithmetic on the cache, no copy written) "
            "and count how many of them a filter by the reference keeps; measure how much better it "
            "retrieves the pool's own pairs than held-out ones (a reference trained on the pool cannot "
            "steer DRRho); then one verdict per method with the numbers it rests on. "
            "docs/studies/study2.md has the evidence."
        ),
    )
    parser.add_argument("shards", nargs="+", help="shard paths, brace patterns or directories")
    parser.add_argument(
        "--reference-cache", default="reference", help="name of the cached reference embeddings"
    )
    parser.add_argument("--cache-dir", help="the sidecars' directory (default: beside each shard)")
    parser.add_argument(
        "--sample", type=_positive, default=100, help="shards read, drawn at random when there are more"
    )
    parser.add_argument("--swap", type=_fraction, default=0.5, help="share of pairs given another's caption")
    parser.add_argument("--keep", type=_fraction, default=0.5, help="share the swap test's filter keeps")
    parser.add_argument(
        "--score", choices=("similarity", "loss"), default="similarity", help="the filter's score (as filter)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and the swaps")
    held = parser.add_mutually_exclusive_group()
    held.add_argument(
        "--held-out",
        nargs="+",
        metavar="SHARDS",
        help="held-out shards cached by the same reference (same --reference-cache name): the memorisation "
        "check's other side",
    )
    held.add_argument(
        "--reference-run",
        help="the reference's jestclip run directory: its final eval/gallery_r5 is the held-out figure",
    )
    parser.add_argument("--held-out-cache-dir", help="the held-out shards' sidecar directory")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")


def _held_out_r5(run_dir: str) -> float:
    from jestclip.report import load_run

    final = load_run(run_dir).final_eval
    if "eval/gallery_r5" not in final:
        raise ValueError(
            f"the final evaluation of {run_dir} has no eval/gallery_r5 (logged before jestclip measured it, "
            "or its eval suites have no retrieval task); give --held-out shards instead"
        )
    return 100 * float(final["eval/gallery_r5"])


def run(args: argparse.Namespace) -> int:
    from jestclip.report.check import check_reference

    held_out_r5 = _held_out_r5(args.reference_run) if args.reference_run else None
    check = check_reference(
        args.shards,
        name=args.reference_cache,
        cache_dir=args.cache_dir,
        sample=args.sample,
        swap=args.swap,
        keep=args.keep,
        score=args.score,
        seed=args.seed,
        held_out=args.held_out,
        held_out_cache_dir=args.held_out_cache_dir,
        held_out_r5=held_out_r5,
        held_out_source=f"final eval/gallery_r5 of {args.reference_run}" if args.reference_run else None,
    )
    if args.json:
        print(json.dumps(check.to_dict()))
        return 0
    print(f"reference {check.cache!r} ({check.model}) on {check.pairs:,} pairs of {check.shards} shards")
    print(
        f"  swap test: {100 * check.swapped_kept:.1f}% swapped among the {100 * check.keep:.0f}% it keeps "
        f"(offered {100 * check.swap:.0f}%; score {check.score})"
    )
    held = "—" if check.held_out_r5 is None else f"{check.held_out_r5:.1f}% ({check.held_out})"
    print(f"  gallery R@5 on the pool's own pairs: {check.pool_r5:.1f}%; held out: {held}")
    for method, verdict in check.verdicts().items():
        print(f"  {method:6s} {verdict}")
    return 0
