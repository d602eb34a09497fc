"""``jestclip data``: install the benchmark's sources, build it, derive a noisier pool, inspect shards."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="the offline image-text benchmark: sources, build, inspect, corrupt (swap a share of captions)",
        description="Check or install the Debian/npm packages the offline curation benchmark is built from, "
        "build it, inspect shards, or derive a noisier pool with a share of its captions swapped.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    sources = actions.add_parser(
        "sources", help="check (or --install) the packages the benchmark is built from"
    )
    sources.add_argument(
        "--install", action="store_true", help="apt-get and npm install what is missing (root)"
    )
    sources.add_argument(
        "--npm-root", type=Path, help="where the npm packages live (default ~/.cache/jestclip/npm)"
    )

    build = actions.add_parser("build", help="render and write pool / curated / eval shards to OUT")
    build.add_argument("out", type=Path)
    build.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--sources", default="openclipart,icons,emoji,tuxpaint", help="comma-separated sources"
    )
    build.add_argument("--limit", type=int, help="at most this many drawings per source (quick builds)")
    build.add_argument("--workers", type=int, help="rendering processes (default: CPU count, at most 8)")
    build.add_argument("--shard-size", type=int, default=1000)
    build.add_argument("--npm-root", type=Path)

    corrupt = actions.add_parser(
        "corrupt",
        help="write a derived pool with a seeded share of captions swapped between pairs (a noise dial)",
        description="Copy the shard directory SRC to OUT (same keys, same images) with a share P of its "
        "pairs taking another chosen pair's caption (none keeps its own), marked 'swapped' in their quality "
        "entry.",
    )
    corrupt.add_argument(
        "src", type=Path, help="a directory of .tar shards (e.g. data/bench/pool, or your own)"
    )
    corrupt.add_argument("out", type=Path, help="a new directory (or one this command began: it resumes)")
    corrupt.add_argument(
        "--swap-captions",
        type=float,
        required=True,
        metavar="P",
        help="share of pairs whose caption is swapped, in [0, 1] (floor(P*N + 0.5) pairs)",
    )
    corrupt.add_argument("--seed", type=int, default=0, help="which pairs swap, and with whom (default 0)")

    inspect = actions.add_parser(
        "inspect", help="counts and random examples of shards (a part or a whole build)"
    )
    inspect.add_argument("path", type=Path, help="a directory of shards, a shard, or a benchmark root")
    inspect.add_argument("--examples", type=int, default=10)
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--markdown", action="store_true", help="print examples as a markdown table")
    inspect.add_argument(
        "--keep-list",
        type=Path,
        help="a keep list of these shards (`jestclip filter --out`): also the ground-truth composition of "
        "the pairs it keeps, i.e. the precision of the reference that scored them (share clean; on a pool "
        "from `jestclip data corrupt`, share swapped)",
    )


def _paths(npm_root: Path | None):
    from jestclip.benchmark.sources import SourcePaths

    return SourcePaths(npm_root=npm_root) if npm_root else SourcePaths()


def run(args: argparse.Namespace) -> int:
    actions = {"sources": _sources, "build": _build, "corrupt": _corrupt, "inspect": _inspect}
    return actions[args.action](args)


def _sources(args: argparse.Namespace) -> int:
    from jestclip.benchmark.sources import install_sources, missing_sources

    paths = _paths(args.npm_root)
    sources = list(paths.required())
    missing = missing_sources(paths, sources)
    if missing and args.install:
        install_sources(paths.npm_root)
        missing = missing_sources(paths, sources)
    for source in sources:
        state = "missing " + ", ".join(map(str, missing[source][:3])) if source in missing else "ok"
        print(f"{source:12s} {state}")
    if missing:
        print(
            "\nrun: jestclip data sources --install   (as root; installs Debian and npm packages)",
            file=sys.stderr,
        )
        return 1
    return 0


def _build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from jestclip.benchmark import BuildConfig, build
    from jestclip.data.files import check_writable

    check_writable(args.out, "output directory", "name another OUT")  # before anything is rendered
    cfg = BuildConfig(size=args.size, seed=args.seed, limit=args.limit, shard_size=args.shard_size)
    cfg = replace(cfg, sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()))
    if args.workers:
        cfg = replace(cfg, workers=args.workers)
    summary = build(args.out, cfg, _paths(args.npm_root))
    print(f"\nbuilt {args.out}:")
    for part, manifest in summary["parts"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(manifest["skipped"].items())) or "none"
        print(f"  {part:18s} {manifest['count']:7,d} pairs   skipped: {skipped}")
    return 0


def _corrupt(args: argparse.Namespace) -> int:
    from jestclip.benchmark.corrupt import corrupt_captions
    from jestclip.data.files import check_writable

    check_writable(args.out, "output directory", "name another OUT")
    manifest = corrupt_captions(args.src, args.out, swap_captions=args.swap_captions, seed=args.seed)
    record = manifest["corrupt"]
    print(f"\nwrote {args.out}: {record['swapped']:,} of {record['pairs']:,} pairs swapped")
    if manifest["composition"]["all"]["labelled"]:
        _print_composition(str(args.out), manifest["composition"])
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from jestclip.data.loader import SuperBatchStream, expand_urls
    from jestclip.data.quality import tally

    path = args.path
    if (path / "build.json").exists():
        summary = json.loads((path / "build.json").read_text(encoding="utf-8"))
        for part, manifest in summary.get("parts", {}).items():
            print(f"{part:18s} {manifest['count']:7,d} pairs  {manifest['by_source']}")
        composition = summary.get("parts", {}).get("pool", {}).get("composition")
        if composition:
            print()
            _print_composition("pool", composition)
        return 0
    from collections import Counter

    urls = expand_urls(path)
    skipped: Counter[str] = Counter()
    stream = SuperBatchStream(urls, batch_size=1, shuffle_shards=False)
    samples = [(s.key, s.url, s.text, s.meta) for s in stream.samples(skipped)]
    print(f"{len(stream.urls)} shards, {len(samples):,} pairs, skipped: {dict(skipped) or 'none'}")
    composition = tally(meta for _, _, _, meta in samples)
    if composition["all"]["labelled"]:
        _print_composition(str(path), composition)
    if args.keep_list is not None:
        _print_kept(args.keep_list, urls, samples, composition)
    chosen = random.Random(args.seed).sample(samples, min(args.examples, len(samples)))
    if args.markdown:
        print("\n| key | source | style | text |\n|---|---|---|---|")
    for key, _, text, meta in chosen:
        text = text.replace("|", "\\|").replace("\n", " ")
        if args.markdown:
            print(f"| `{key}` | {meta.get('source', '')} | {meta.get('style', '')} | {text} |")
        else:
            print(f"{key}  [{meta.get('source', '')}/{meta.get('style', '')}]  {text}")
    return 0


def _print_kept(directory: Path, urls: list[str], samples: list, composition: dict) -> None:
    """The composition of the pairs keep list ``directory`` keeps among ``samples`` (key, url, text, meta),
    and one line comparing it with all of them: the precision of the reference that scored them."""
    from jestclip.data.keeplist import KeepList
    from jestclip.data.quality import CLEAN, tally

    keep = KeepList(directory)
    keep.check(urls)  # one line when the keep list is for other shards, or they changed
    kept = tally(meta for key, url, _, meta in samples if keep(url, key))
    pairs, everything = kept["all"]["pairs"], composition["all"]
    print(f"\nkeep list {directory} keeps {pairs:,} of {everything['pairs']:,} pairs")
    if not everything["labelled"]:
        print("(no pair carries a 'quality' entry: no ground truth to compare with)")
        return
    if kept["all"]["labelled"]:
        _print_composition(f"the kept pairs of {directory}", kept)

    def share(counts: dict[str, int], what: str) -> float:
        return counts.get(what, 0) / counts["pairs"]

    parts = []
    if everything["labelled"] == everything["pairs"]:  # clean is known for every pair
        clean, clean_all = share(kept["all"], CLEAN), share(everything, CLEAN)
        parts.append(
            f"precision: {clean:.1%} of kept pairs clean against {clean_all:.1%} of all"
            + (f" (lift {clean / clean_all:.2f})" if clean_all else "")
        )
    if everything.get("swapped"):  # `data corrupt` labels every pair it swaps, in any source
        swapped, swapped_all = share(kept["all"], "swapped"), share(everything, "swapped")
        parts.append(f"swapped {swapped:.1%} of kept against {swapped_all:.1%}")
    print("; ".join(parts) or "(only some pairs carry a 'quality' entry: no precision to give)")


def _print_composition(name: str, composition: dict[str, dict[str, int]]) -> None:
    """A table of ``jestclip.data.quality.tally`` counts: rows clean, each noise kind and the unclean pairs
    no kind names; columns all and each source; each cell the count and its share of the column's labelled
    pairs (a pair can carry several kinds, so kind shares need not sum to 100%)."""
    from jestclip.data.quality import CLEAN, NOISE_KINDS

    groups = list(composition)
    rows = [CLEAN, *(k for k in NOISE_KINDS if any(composition[g].get(k) for g in groups)), "unclean_unnamed"]
    labelled = composition["all"]["labelled"]
    print(f"composition of {name}: {labelled:,} of {composition['all']['pairs']:,} pairs labelled")
    print(f"{'':18s}" + "".join(f"{g:>18s}" for g in groups))
    for row in rows:
        cells = []
        for g in groups:
            count, total = composition[g].get(row, 0), composition[g]["labelled"]
            cells.append(f"{count:>10,d} {count / total:6.1%}" if total else f"{'-':>18s}")
        print(f"{row:18s}" + "".join(cells))
