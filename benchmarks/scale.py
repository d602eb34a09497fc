"""Scale-out, simulated on one machine: the filter's time and peak memory against the pool's size and the
number of ranks, a training rank's startup against the number of shards, and caching throughput per process.

Simulated caches (``generate``): SHARDS x ROWS pairs at a small DIM in float16, written with
``write_sidecar`` beside empty shard files (no images: the filter runs with ``check_content=False``, as the
caller of a simulation must say), keys ``SSSSSSRRRRRR``, random unit rows. Each measurement runs in fresh
processes (peak RSS per process from ``getrusage``), ranks as ``torch.multiprocessing`` processes over gloo.

    python benchmarks/scale.py filter --root /tmp/scale --shards 1000 --rows 10000 --dim 8 --ranks 1 2
    python benchmarks/scale.py startup --root /tmp/scale-start --shards 100000 --rows 16 --world 64
    python benchmarks/scale.py cache --data data/bench/pool --shards 8 --processes 1 2
    python benchmarks/scale.py cache --data data/bench/pool --shards 6 --processes 1 --device cuda \\
        --model ViT-B-16 --workers 8                    # images/s on one GPU (a device session)

``filter``: filter_shards (similarity, Q = 0.5) on the cache, per number of ranks: wall time, peak RSS per
rank, and, with ``--in-memory``, the whole-pool path that the loss score still takes (for comparison).
``startup``: what a training rank of ``--world`` does before its first step that grows with the pool — open
the reference cache and check the keep list — for rank 0's shards (a streamed rank) and for all shards (a
memory pool, and what every rank did before): seconds each. ``cache``: `jestclip cache-reference` with
``--model`` (jest-micro by default, randomly initialised) on ``--device`` over the first ``--shards`` shards
of a pool, one process and ``torchrun`` with N: images per second per process, beside decoding alone (one
process) and the model alone (ready tensors), to say which bounds it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "scale"
ROOT = Path(__file__).resolve().parents[1]


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB), memory-mapped file pages included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``: what it holds, without the
    memory-mapped file pages the kernel may drop), sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _AnonPeak:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def generate(root: Path, shards: int, rows: int, dim: int) -> float:
    """Write the simulated cache (skips shards already written); seconds."""
    from jestclip.data.refcache import CacheMeta, sidecar_path, write_sidecar

    root.mkdir(parents=True, exist_ok=True)
    meta = CacheMeta("scale", "scale", 10.0, -10.0, dim, 0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for shard in range(shards):
        url = root / f"{shard:06d}.tar"
        if sidecar_path(url, NAME).exists():
            continue
        url.touch()
        image = rng.standard_normal((rows, dim)).astype(np.float32)
        text = image + rng.standard_normal((rows, dim)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        keys = [f"{shard:06d}{row:06d}" for row in range(rows)]
        digests = rng.integers(0, 2**63, rows).tolist()
        write_sidecar(
            url, NAME, keys, image.astype(np.float16), text.astype(np.float16), meta, digests=digests
        )
    return time.perf_counter() - started


def _filter_rank(
    rank: int, world: int, store: str, root: str, out: str, result: str, in_memory: bool
) -> None:
    import torch.distributed as dist

    from jestclip.data import keeplist  # noqa: F401 - imported before the baseline is read

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    before, anon_before = _peak_rss(), _AnonPeak.now()  # the interpreter with torch and jestclip imported
    started = time.perf_counter()
    with _AnonPeak() as anon:
        _filter(root, out, in_memory)
    seconds = time.perf_counter() - started
    record = {"seconds": seconds, "peak": _peak_rss(), "before": before, "anon": anon.peak - anon_before}
    Path(f"{result}.{rank}").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def _filter(root: str, out: str, in_memory: bool) -> None:
    from jestclip.data import keeplist

    if in_memory:
        settings: dict[str, Any] = {}
        keeplist._in_memory(
            root,
            Path(out),
            0.5,
            "similarity",
            settings,
            name=NAME,
            fingerprint=None,
            cache_dir=None,
            progress=False,
            check_content=False,
            loss="sigmoid",
            batch_size=1024,
            seed=0,
        )
    else:
        keeplist.filter_shards(root, out, keep=0.5, name=NAME, progress=False, check_content=False)


def measure_filter(root: Path, ranks: int, in_memory: bool) -> dict[str, Any]:
    """Filter the cache under ``root`` on ``ranks`` processes; wall seconds and each rank's peak RSS."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out, result = f"{tmp}/keep", f"{tmp}/result"
        started = time.perf_counter()
        mp.spawn(_filter_rank, args=(ranks, f"{tmp}/store", str(root), out, result, in_memory), nprocs=ranks)
        wall = time.perf_counter() - started
        per_rank = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(ranks)]
        kept = json.loads((Path(out) / "keep.json").read_text())["kept"]
    return {
        "wall": wall,
        "seconds": max(r["seconds"] for r in per_rank),
        "peak": max(r["peak"] for r in per_rank),
        "grown": max(r["peak"] - r["before"] for r in per_rank),
        "anon": max(r["anon"] for r in per_rank),
        "kept": kept,
    }


def run_filter(args: argparse.Namespace) -> None:
    seconds = generate(args.root, args.shards, args.rows, args.dim)
    n = args.shards * args.rows
    print(
        f"cache: {args.shards:,} shards x {args.rows:,} rows = {n:,} pairs, dim {args.dim} ({seconds:.0f} s)"
    )
    print(
        "| pairs | path | ranks | filter s (slowest rank) | pairs/s | anonymous memory grown while "
        "filtering, per rank (MiB) | peak RSS with mapped files, per rank (MiB) | of it, grown while "
        "filtering (MiB) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    paths = [(ranks, False) for ranks in args.ranks] + ([(1, True)] if args.in_memory else [])
    for ranks, whole in paths:
        got = measure_filter(args.root, ranks, in_memory=whole)
        label = "whole pool in memory" if whole else "streamed"
        print(
            f"| {n:,} | {label} | {ranks} | {got['seconds']:.1f} | {n / got['seconds']:,.0f} | "
            f"{got['anon'] / 2**20:,.0f} | {got['peak'] / 2**20:,.0f} | {got['grown'] / 2**20:,.0f} |",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(args.root)


def _startup_once(root: str, keep_dir: str, world: int, own_only: bool, result: str) -> None:
    from jestclip.data.keeplist import KeepList
    from jestclip.data.loader import SuperBatchStream, expand_urls
    from jestclip.data.refcache import ReferenceCache

    started = time.perf_counter()
    urls = expand_urls(root)
    listed = time.perf_counter()
    stream = SuperBatchStream(urls, batch_size=1, resampled=True, seed=0, rank=0, world_size=world)
    own = stream.rank_shards() if own_only else urls
    ReferenceCache(own, name=NAME)
    opened = time.perf_counter()
    KeepList(keep_dir).check(urls, own)
    checked = time.perf_counter()
    Path(result).write_text(
        json.dumps(
            {
                "list": listed - started,
                "reference": opened - listed,
                "keep": checked - opened,
                "total": checked - started,
                "own": len(own),
                "peak": _peak_rss(),
            }
        )
    )


def run_startup(args: argparse.Namespace) -> None:
    from jestclip.data.keeplist import filter_shards

    seconds = generate(args.root, args.shards, args.rows, args.dim)
    keep_dir = args.root.with_name(args.root.name + "-keep")
    if not (keep_dir / "keep.json").exists():
        filter_shards(str(args.root), keep_dir, keep=0.5, name=NAME, progress=False, check_content=False)
    print(f"cache: {args.shards:,} shards x {args.rows} rows ({seconds:.0f} s to write); keep list written")
    print(
        "| shards | rank reads | shards opened | list s | reference cache s | keep list s | total s "
        "| peak MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for own_only, label in (
        (True, f"its own (rank 0 of {args.world})"),
        (False, "all (memory pool; before)"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            here, result = str(Path(__file__).parent), f"{tmp}/r"
            call = (
                f"_startup_once({str(args.root)!r}, {str(keep_dir)!r}, {args.world}, {own_only}, {result!r})"
            )
            code = f"import sys; sys.path.insert(0, {here!r}); import scale; scale.{call}"
            subprocess.run([sys.executable, "-c", code], check=True)
            got = json.loads(Path(f"{tmp}/r").read_text())
        print(
            f"| {args.shards:,} | {label} | {got['own']:,} | {got['list']:.2f} | {got['reference']:.2f} | "
            f"{got['keep']:.2f} | {got['total']:.2f} | {got['peak'] / 2**20:,.0f} |",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(args.root)
        shutil.rmtree(keep_dir)


def _decode_rate(shards: list[str], model: str, batch_size: int) -> tuple[float, int]:
    """Images per second the loader decodes and transforms for ``model`` in this process (no model run), and
    how many it decoded."""
    from jestclip.data import SuperBatchStream
    from jestclip.models import image_transform

    stream = SuperBatchStream(
        shards, batch_size=batch_size, shuffle_shards=False, transform=image_transform(model)
    )
    started, n = time.perf_counter(), 0
    for batch in stream:
        n += len(batch)
    return n / (time.perf_counter() - started), n


def _model_rate(model_name: str, device: str, batch_size: int, n: int = 4096) -> float:
    """Pairs per second ``model_name`` embeds from ready tensors on ``device`` (``reference_embedder``, as
    ``cache-reference`` runs it: bf16 autocast on CUDA), no decoding."""
    import torch

    from jestclip.models import create_model, image_size, reference_embedder, tokenizer

    model = create_model(model_name).to(device)
    embed = reference_embedder(model, tokenizer(model_name))
    size = image_size(model_name)
    images, texts = torch.rand(batch_size, 3, size, size), ["a caption of a few words"] * batch_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    embed(images, texts)
    sync()
    started = time.perf_counter()
    for _ in range(max(1, n // batch_size)):
        embed(images, texts)
    sync()
    return max(1, n // batch_size) * batch_size / (time.perf_counter() - started)


def run_cache(args: argparse.Namespace) -> None:
    import torch

    from jestclip.data.shardlist import shard_files

    shards = shard_files(args.data)[: args.shards]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        from jestclip.models import create_model

        torch.save(create_model(args.model).state_dict(), f"{tmp}/ref.pt")
        decode, images = _decode_rate(shards, args.model, args.batch_size)
        workers = f", {args.workers} loader workers" if args.workers is not None else ""
        print(
            f"{len(shards)} shards of {args.data}, {images:,} pairs; {args.model} on {args.device}, "
            f"batch {args.batch_size}{workers}"
        )
        print("| what | processes | wall s | of it, caching s | images/s per process | images/s in all |")
        print("|---|---:|---:|---:|---:|---:|")
        model = _model_rate(args.model, args.device, args.batch_size)
        print(f"| decoding + transform alone | 1 | — | — | {decode:,.0f} | {decode:,.0f} |")
        print(f"| model alone (ready tensors) | 1 | — | — | {model:,.0f} | {model:,.0f} |", flush=True)
        for n in args.processes:
            cache_dir = f"{tmp}/cache{n}"
            command = [
                "cache-reference",
                *shards,
                "--model",
                args.model,
                "--checkpoint",
                f"{tmp}/ref.pt",
                "--cache-dir",
                cache_dir,
                "--device",
                args.device,
                "--batch-size",
                str(args.batch_size),
                *(["--workers", str(args.workers)] if args.workers is not None else []),
            ]
            if n > 1:  # torchrun's own module form, so that nothing needs an installed entry point
                torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"]
                command = [*torchrun, "--master_port=29561", "-m", "jestclip", *command]
            else:
                command = [sys.executable, "-m", "jestclip", *command]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            started = time.perf_counter()
            done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            summary = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
            work = summary["seconds"]  # the slowest rank's
            if summary["samples"] != images:
                raise SystemExit(
                    f"cache-reference embedded {summary['samples']} pairs, decoding alone {images}"
                )
            print(
                f"| cache-reference | {n} | {wall:.1f} | {work:.1f} | {images / work / n:,.0f} | "
                f"{images / work:,.0f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("filter", "startup"):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, required=True)
        p.add_argument("--shards", type=int, required=True)
        p.add_argument("--rows", type=int, required=True)
        p.add_argument("--dim", type=int, default=8)
        p.add_argument("--keep", action="store_true", help="keep the generated cache")
    sub.choices["filter"].add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    sub.choices["filter"].add_argument("--in-memory", action="store_true")
    sub.choices["startup"].add_argument("--world", type=int, default=64)
    cache = sub.add_parser("cache")
    cache.add_argument("--data", default="data/bench/pool")
    cache.add_argument("--shards", type=int, default=8)
    cache.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    cache.add_argument("--model", default="jest-micro", help="reference model config (randomly initialised)")
    cache.add_argument("--device", default="cpu", help="cpu, or cuda (one process per GPU under torchrun)")
    cache.add_argument("--batch-size", type=int, default=256)
    cache.add_argument("--workers", type=int, help="cache-reference's loader workers (its default if unset)")
    args = parser.parse_args()
    print(
        f"{platform.node()}, {os.cpu_count()} cores, {datetime.date.today()}: python benchmarks/scale.py "
        + " ".join(sys.argv[1:])
    )
    {"filter": run_filter, "startup": run_startup, "cache": run_cache}[args.what](args)


if __name__ == "__main__":
    main()
