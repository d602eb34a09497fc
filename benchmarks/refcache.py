"""The reference-embedding cache at scale: open time, resident memory and lookup time, old vs new format.

Generates a cache of SHARDS x ROWS pairs at DIM in float16 under ROOT (fake, empty shard files: no images,
so the cache is written with ``write_sidecar`` directly), and the old ``.npz`` format for the first
OLD_SHARDS shards (the old ``ReferenceCache`` holds everything in RAM, twice at peak: it cannot open 10^7
rows in 24 GiB). Each measurement runs in a fresh process: open time, RSS after opening (``VmRSS``, and its
anonymous part ``RssAnon``: file-backed pages of a memory map are page cache the kernel can drop), peak
RSS, and the median time of 20 lookups of a super-batch of 16,384 keys, either uniformly random over the
cache or in loader order (4 shards x 4,096 consecutive samples, as 4 workers each reading a shard).
Prints a markdown table; deletes ROOT afterwards unless --keep.

    python benchmarks/refcache.py --root /tmp/refcache-bench --shards 1000 --rows 10000 --old-shards 100

What the checks for changed shards cost (open, lookup with and without content digests, the loader's
digest per sample), at 10^4 shards of small sidecars:

    python benchmarks/refcache.py --staleness --root /tmp/refcache-stale --shards 10000 --rows 4096 --dim 64

The old implementation is imported from a file: ``git show HEAD:src/jestclip/data/refcache.py >
/tmp/old_refcache.py`` (commit f4a05e3) and pass ``--old /tmp/old_refcache.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "bench"


def shard_url(root: Path, shard: int) -> str:
    return str(root / f"{shard:05d}.tar")


def shard_keys(shard: int, rows: int) -> list[str]:
    return [f"{shard:05d}{row:05d}" for row in range(rows)]


def shard_rows(template: np.ndarray, shard: int) -> np.ndarray:
    """The template with (shard, row) written into the first 4 dims, exactly (fp16 integers < 2048)."""
    rows = template.copy()
    index = np.arange(len(rows))
    rows[:, 0], rows[:, 1] = shard % 1024, shard // 1024
    rows[:, 2], rows[:, 3] = index % 1024, index // 1024
    return rows


def generate(root: Path, shards: int, rows: int, dim: int, old_shards: int) -> dict[str, float]:
    """Write the new-format cache of all shards and the old-format one of the first ``old_shards``."""
    from jestclip.data.refcache import CacheMeta, write_sidecar

    root.mkdir(parents=True, exist_ok=True)
    template = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    template = (template / np.linalg.norm(template, axis=1, keepdims=True)).astype(np.float16)
    meta = CacheMeta("bench", "bench", 10.0, -10.0, dim, 0)
    digests = list(range(rows))
    seconds = {}
    start = time.perf_counter()
    for shard in range(shards):
        Path(shard_url(root, shard)).touch()
        image = shard_rows(template, shard)
        keys = shard_keys(shard, rows)
        write_sidecar(shard_url(root, shard), NAME, keys, image, -image, meta, digests=digests)
    seconds["new"] = time.perf_counter() - start
    start = time.perf_counter()
    for shard in range(old_shards):
        image = shard_rows(template, shard)
        with open(root / f"{shard:05d}.{NAME}.npz", "wb") as f:
            np.savez(
                f,
                keys=np.array(shard_keys(shard, rows), dtype=str),
                image=image,
                text=-image,
                meta=np.array(json.dumps(meta.__dict__)),
            )
    seconds["old"] = time.perf_counter() - start
    return seconds


def memory() -> dict[str, int]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        field, _, value = line.partition(":")
        if field in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[field] = int(value.split()[0]) * 1024
    return out


def batches(pattern: str, shards: int, rows: int, size: int, count: int, seed: int = 0) -> list[tuple]:
    """``count`` lookups of ``size`` (shard, row) pairs: uniformly random, or 4 shards of consecutive rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if pattern == "random":
            shard, row = rng.integers(0, shards, size), rng.integers(0, rows, size)
        else:
            per = size // 4
            starts = rng.integers(0, rows - per + 1, 4)
            shard = np.repeat(rng.choice(shards, 4, replace=False), per)
            row = np.concatenate([np.arange(s, s + per) for s in starts])
        out.append((shard, row))
    return out


def page_cache(files: list[Path], state: str) -> None:
    """Drop ``files`` from the page cache (cold: every read goes to the disk) or read them into it (warm)."""
    for path in files:
        with open(path, "rb") as f:
            if state == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(1 << 24):
                    pass


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Open the cache of the first ``args.n`` shards with implementation ``args.measure``; time lookups."""
    if args.measure == "old":
        spec = importlib.util.spec_from_file_location("old_refcache", args.old)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_refcache"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    else:
        from jestclip.data import refcache as module
    urls = [shard_url(args.root, s) for s in range(args.n)]
    kind = "npz" if args.measure == "old" else "emb.npy"  # (the keys and digests are small beside them)
    files = [args.root / f"{s:05d}.{NAME}.{kind}" for s in range(args.n)]
    plan = batches(args.pattern, args.n, args.rows, args.batch, args.lookups)
    queries = [
        ([f"{s:05d}{r:05d}" for s, r in zip(sh, rw, strict=True)], [urls[s] for s in sh]) for sh, rw in plan
    ]
    page_cache(files, args.cache)
    before = memory()
    start = time.perf_counter()
    cache = module.ReferenceCache(urls, name=NAME)
    opened = time.perf_counter() - start
    after_open = memory()
    times = []
    for (keys, shard_urls), (shard, row) in zip(queries, plan, strict=True):
        if args.cache == "cold":
            getattr(cache, "_open", {}).clear()  # unmap: mapped pages stay in the page cache
            page_cache(files, "cold")
        start = time.perf_counter()
        if args.measure == "old":
            emb = cache.lookup(keys)
        else:  # fake, empty shards: no content to check; the per-row finite check is measured
            emb = cache.lookup(keys, shard_urls, check_content=False)
        times.append(time.perf_counter() - start)
        marks = emb.image[:, :4].numpy()
        assert (marks[:, 0] + 1024 * marks[:, 1] == shard).all() and (
            marks[:, 2] + 1024 * marks[:, 3] == row
        ).all()
    after = memory()
    return {
        "open_s": opened,
        "rss_open": after_open["VmRSS"] - before["VmRSS"],
        "anon_open": after_open["RssAnon"] - before["RssAnon"],
        "peak": after["VmHWM"] - before["VmRSS"],
        "rss_end": after["VmRSS"] - before["VmRSS"],
        "anon_end": after["RssAnon"] - before["RssAnon"],
        "lookup_ms": 1000 * statistics.median(times),
    }


def run_measure(args: argparse.Namespace, impl: str, n: int, pattern: str, cache: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--measure",
        impl,
        "--n",
        str(n),
        "--pattern",
        pattern,
        "--cache",
        cache,
    ]
    command += ["--root", str(args.root), "--rows", str(args.rows), "--old", str(args.old)]
    command += ["--batch", str(args.batch), "--lookups", str(args.lookups)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measuring {impl} on {n} shards failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def staleness(args: argparse.Namespace) -> None:
    """What checking for changed shards costs at ``--shards`` shards (10^4): opening (one header and three
    ``stat``s per shard, plus the local shard's size), a lookup with and without content digests, and the
    loader's content digest per sample (a 30 KB image and its caption)."""
    from jestclip.data.loader import content_digest
    from jestclip.data.refcache import CacheMeta, ReferenceCache, write_sidecar

    root, rows, dim = args.root, args.rows, args.dim
    root.mkdir(parents=True, exist_ok=True)
    meta = CacheMeta("bench", "bench", 10.0, -10.0, dim, 0)
    unit = np.full((rows, dim), dim**-0.5, np.float16)
    start = time.perf_counter()
    for shard in range(args.shards):
        Path(shard_url(root, shard)).touch()
        write_sidecar(
            shard_url(root, shard), NAME, shard_keys(shard, rows), unit, unit, meta, digests=range(rows)
        )
    written = time.perf_counter() - start
    urls = [shard_url(root, s) for s in range(args.shards)]
    files = [p for p in root.iterdir() if p.name.endswith((".json", ".npy"))]
    opens = {}
    for state in ("cold", "warm"):
        page_cache(files, state)
        start = time.perf_counter()
        cache = ReferenceCache(urls, name=NAME)
        opens[state] = time.perf_counter() - start
    per = args.batch // 4
    keys = [k for s in range(4) for k in shard_keys(s * 997 % args.shards, rows)[:per]]
    shard_of = [urls[s * 997 % args.shards] for s in range(4) for _ in range(min(per, rows))]
    digests = [int(k[5:]) for k in keys]
    lookups = {}
    for label, kw in (("without digests", {"check_content": False}), ("with digests", {"digests": digests})):
        cache.lookup(keys, shard_of, **kw)  # maps the four shards
        times = []
        for _ in range(args.lookups):
            start = time.perf_counter()
            cache.lookup(keys, shard_of, **kw)
            times.append(time.perf_counter() - start)
        lookups[label] = 1000 * statistics.median(times)
    raw = {
        "__key__": "k",
        "jpg": np.random.default_rng(0).bytes(30_000),
        "txt": b"a caption of sixty bytes" * 2,
    }
    start = time.perf_counter()
    for _ in range(10_000):
        content_digest(raw)
    digest_us = (time.perf_counter() - start) / 10_000 * 1e6
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.shards:,} sidecars of {rows} rows (dim {dim}) in {written:.0f} s")
    print(f"open {args.shards:,} shards: {opens['cold']:.2f} s cold, {opens['warm']:.2f} s warm")
    for label, ms in lookups.items():
        print(f"lookup of {len(keys):,} keys (4 shards), {label}: {ms:.2f} ms (median of {args.lookups})")
    print(f"content_digest of a 30 KB image + caption: {digest_us:.1f} us per sample")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/refcache-bench"))
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--old-shards", type=int, default=100)
    parser.add_argument("--old", type=Path, default=Path("/tmp/old_refcache.py"))
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--lookups", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the generated cache")
    parser.add_argument(
        "--staleness", action="store_true", help="measure what the changed-shard checks cost instead"
    )
    parser.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="random", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="cold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    if args.staleness:
        staleness(args)
        return
    need = args.shards * args.rows * 4 * args.dim * 1.05 + args.old_shards * args.rows * 4 * args.dim
    free = shutil.disk_usage(args.root.parent).free
    if need > free - 10 * 2**30 and not (args.root / "done.json").exists():
        raise SystemExit(f"needs {gib(need)} under {args.root}, {gib(free)} free: use fewer --shards")
    try:
        if (args.root / "done.json").exists():  # kept from a previous run (--keep)
            written = json.loads((args.root / "done.json").read_text())
        else:
            written = generate(args.root, args.shards, args.rows, args.dim, args.old_shards)
            (args.root / "done.json").write_text(json.dumps(written))
        print(
            f"wrote {args.shards:,} shards ({gib(args.shards * args.rows * 4 * args.dim)}) in "
            f"{written['new']:.0f} s; the old format of {args.old_shards:,} in {written['old']:.0f} s\n"
        )
        plan = [("old", args.old_shards, "random", "cold"), ("new", args.old_shards, "random", "warm")]
        plan += [("new", args.old_shards, "random", "cold"), ("new", args.shards, "random", "cold")]
        plan += [("new", args.shards, "loader", "cold")]
        rows = [(*p, run_measure(args, *p)) for p in plan]
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(
        f"| implementation | rows (shards) | open | RSS after open (anon) | page cache | lookup pattern | "
        f"lookup of {args.batch:,}, median of {args.lookups} | peak RSS | RSS after lookups (anon) |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for impl, n, pattern, cache, m in rows:
        print(
            f"| {impl} | {n * args.rows:,} ({n:,}) | {m['open_s']:.2f} s | {gib(m['rss_open'])} "
            f"({gib(m['anon_open'])}) | {cache} | {pattern} | {m['lookup_ms']:,.0f} ms | {gib(m['peak'])} | "
            f"{gib(m['rss_end'])} ({gib(m['anon_end'])}) |"
        )


if __name__ == "__main__":
    main()
