"""Loader throughput: images/s of ``SuperBatchStream`` per DataLoader worker, and the workers ViT-B/16 needs.

Measures ``DataLoader(SuperBatchStream(urls, batch_size=, transform=, resampled=True, seed=0),
batch_size=None, num_workers=W)`` for W = 0 (main process), 1 and 2 on

- the benchmark's shards (``--pool``, 64-px PNGs) through ``image_transform("jest-micro")`` (32 px) and
  ``image_transform("jest-tiny")`` (64 px);
- generated 256-px JPEG shards (smooth gradients plus noise, quality 90, written under ``--jpeg-dir``)
  through the 224-px open_clip transform (``image_transform("ViT-B-16")``; no weights are loaded).

The first 2 batches per worker (start-up) are not timed; then ``--samples`` images are. From the 224-px
JPEG rate of one worker it prints the workers needed to feed ViT-B/16 at 224 px, b = 512: IID reads b images
per step, JEST and Flexi-JEST B = b / (1 - f). The step rates are arguments; their defaults are estimates
(see ``--iid-steps-per-s``) to be replaced by the step times ``benchmarks/gpu.py`` measures on the GPU.

The same loader on generated 512-px JPEG shards, decoding in full (``decode_size=None``) and at reduced
size (``decode_size=224``, PIL's draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers
the target; what ``jestclip train`` does with ``draft_decode=True``). It also times, per image in the
main process (1 torch thread), ``jestclip.data.open_image`` + the 224-px transform both ways on 256-, 512-
and 1024-px JPEGs; and ``torchvision.io.decode_jpeg(..., device="cuda")`` when CUDA is available.

    python benchmarks/loader.py                  # full run, < 3 minutes on 2 cores
    python benchmarks/loader.py --quick          # generated shards only, few samples (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from jestclip.data import Pair, SuperBatchStream, open_image, write_shard
from jestclip.data.loader import shard_files
from jestclip.models import image_transform

BATCH = 512  # b of the ViT-B/16 configuration the workers are counted for
TARGET = 224
# ViT-B/16 at 224 px: 41.1 GFLOP forward per pair (jestclip.models.forward_flops), so an IID training step of
# 512 is 3 x 41.1 x 512 = 63.1 TFLOP; at ~40% of an H100's 989 TFLOP/s dense bf16 that is ~6 steps/s.
IID_STEPS_PER_S = 6.0
JEST_COST = 7 / 3  # the paper's JEST step cost over IID at f = 0.8 (cached reference, scoring reused)
FLEXI_COST = 1.10  # the paper's Flexi-JEST step cost over IID (upper end of its 1.04-1.10)


def natural_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random image: per-channel gradients, a few soft blobs and a sinusoid, plus pixel noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(0, 255), rng.uniform(-120, 120), rng.uniform(-120, 120)
        value = a + b * x + c * y
        fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.3)
        value += rng.uniform(10, 40) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(value)
    image = np.stack(channels, axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(-90, 90, 3)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_jpeg_shards(root: Path, count: int, size: int, per_shard: int = 250) -> list[str]:
    """``count`` generated JPEGs of ``size`` px in shards of ``per_shard`` under ``root`` (kept if present).

    ``write_shard`` names every image member ``KEY.png``; PIL and the loader decode by content, so these
    members are decoded as JPEG.
    """
    shards = [root / f"{i:05d}.tar" for i in range((count + per_shard - 1) // per_shard)]
    stamp = root / f"generated-{count}-{size}.txt"
    if stamp.exists() and all(p.exists() for p in shards):
        return [str(p) for p in shards]
    rng = np.random.default_rng(0)
    for s, path in enumerate(shards):
        n = min(per_shard, count - s * per_shard)
        pairs = [
            Pair(f"g{s:03d}_{i:04d}", jpeg_bytes(natural_image(rng, size)), f"generated image {s} {i}")
            for i in range(n)
        ]
        write_shard(path, pairs)
    stamp.write_text("done\n")
    return [str(p) for p in shards]


def throughput(
    urls: list[str],
    transform: Callable,
    workers: int,
    args: argparse.Namespace,
    threads: int | None = None,
    decode_size: int | None = None,
) -> float:
    """Images/s through a DataLoader with ``workers`` workers, start-up (2 batches per worker) excluded.

    Times ``args.samples`` images or, if that takes longer, ``args.max_seconds``. ``threads``: torch's
    intra-op threads in the main process (None: as they are); DataLoader workers always use 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        size = args.batch_size
        stream = SuperBatchStream(
            urls, batch_size=size, transform=transform, resampled=True, seed=0, decode_size=decode_size
        )
        batches = iter(DataLoader(stream, batch_size=None, num_workers=workers))
        for _ in range(2 * max(1, workers)):
            next(batches)
        start, seen = time.perf_counter(), 0
        while seen < args.samples and time.perf_counter() - start < args.max_seconds:
            seen += len(next(batches))
        elapsed = time.perf_counter() - start
        del batches  # shuts the workers down
    finally:
        torch.set_num_threads(before)
    return seen / elapsed


def settings(workers: list[int]) -> list[tuple[int, int | None, str]]:
    """(workers, main-process torch threads, label): W = 0 both with torch's default threads and with 1."""
    out: list[tuple[int, int | None, str]] = []
    for w in workers:
        if w == 0:
            n = torch.get_num_threads()
            out.append((0, None, f"0 (main process, {n} torch thread{'s' if n > 1 else ''})"))
            if torch.get_num_threads() > 1:
                out.append((0, 1, "0 (main process, 1 torch thread)"))
        else:
            out.append((w, None, str(w)))
    return out


def per_image_ms(fns: list[Callable[[bytes], object]], blobs: list[bytes], passes: int = 3) -> list[float]:
    """Mean ms per image of each ``fn(blob)``, median over ``passes`` passes taken in turn (so that the other
    jobs on the machine slow every function alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(passes):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            for blob in blobs:
                fn(blob)
            out.append(1000 * (time.perf_counter() - start) / len(blobs))
    return [statistics.median(t) for t in times]


def draft_rows(sizes: list[int], count: int, transform: Callable) -> list[str]:
    """Rows: decode alone and decode + 224-px transform, full vs draft decode, ``count`` JPEGs per size."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rng = np.random.default_rng(1)
    rows = []
    for size in sizes:
        blobs = [jpeg_bytes(natural_image(rng, size)) for _ in range(count)]
        full, full_t, draft, draft_t = per_image_ms(
            [
                lambda b: open_image(b),
                lambda b: transform(open_image(b)),
                lambda b: open_image(b, decode_size=TARGET),
                lambda b: transform(open_image(b, decode_size=TARGET)),
            ],
            blobs,
        )
        scale = open_image(blobs[0], decode_size=TARGET).width / size
        rows.append(
            f"| {size} px | {full:.2f} | {full_t:.2f} | {draft:.2f} ({scale:g}x) | {draft_t:.2f} | "
            f"{full_t / draft_t:.2f}x |"
        )
    torch.set_num_threads(before)
    return rows


def gpu_decode_line(blobs: list[bytes]) -> str:
    """images/s of ``torchvision.io.decode_jpeg(..., device="cuda")`` on a batch, or why it was skipped."""
    if not torch.cuda.is_available():
        return 'GPU decode (`torchvision.io.decode_jpeg(..., device="cuda")`): skipped, no CUDA here.'
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    rate = 3 * len(data) / (time.perf_counter() - start)
    return f'GPU decode (`decode_jpeg(..., device="cuda")`, batches of {len(data)}): {rate:,.0f} images/s.'


def loader_rows(args: argparse.Namespace, jpeg_urls: list[str]) -> tuple[list[str], dict[int, float]]:
    """The throughput table's rows, and the 224-px JPEG rate by worker count."""
    configs = [("generated 256-px JPEG q90", "ViT-B-16 (224 px)", jpeg_urls, image_transform("ViT-B-16"))]
    if not args.quick:
        pool = shard_files(args.pool)  # every shard form the loader reads
        configs = [
            ("bench pool, 64-px PNG", "jest-micro (32 px)", pool, image_transform("jest-micro")),
            ("bench pool, 64-px PNG", "jest-tiny (64 px)", pool, image_transform("jest-tiny")),
            *configs,
        ]
    rows, jpeg_rates = [], {}
    for source, name, urls, transform in configs:
        for workers, threads, label in settings(args.workers):
            rate = throughput(urls, transform, workers, args, threads)
            per = rate / max(1, workers)
            rows.append(f"| {source} | {name} | {label} | {rate:,.0f} | {per:,.0f} |")
            print(rows[-1], flush=True)
            if urls is jpeg_urls and threads is None:
                jpeg_rates[workers] = rate
    return rows, jpeg_rates


def draft_loader_row(args: argparse.Namespace, urls: list[str]) -> str:
    """A row: the loader on large JPEGs through the 224-px transform, full vs reduced-size decoding, with the
    first worker count of ``--workers`` above 0 (or the main process, 1 thread)."""
    workers = next((w for w in args.workers if w > 0), 0)
    threads = 1 if workers == 0 else None
    transform = image_transform("ViT-B-16")
    full = throughput(urls, transform, workers, args, threads)
    draft = throughput(urls, transform, workers, args, threads, decode_size=TARGET)
    return f"| {workers} | {full:,.0f} | {draft:,.0f} | {draft / full:.2f}x |"


def workers_rows(args: argparse.Namespace, per_worker: float) -> list[str]:
    """Workers needed = images/s needed / images/s per worker, for ViT-B/16 at b = 512."""
    plan = [("IID", 0.0, args.iid_steps_per_s)]
    for f in (0.8, 0.9):
        plan += [("JEST", f, args.jest_steps_per_s), ("Flexi-JEST", f, args.flexi_steps_per_s)]
    rows = []
    for method, f, steps in plan:
        images = round(BATCH / (1 - f))
        needed = images * steps
        ratio = f"{f:g}" if f else "—"
        rows.append(
            f"| {method} | {ratio} | {images:,} | {steps:.2f} | {needed:,.0f} | {needed / per_worker:.1f} |"
        )
    return rows


def header(args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"Machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}; load average at start "
        f"{load} (other jobs share the cores). Date: {datetime.date.today()}. Timed: {args.samples:,} images "
        f"per row (or {args.max_seconds:g} s if shorter) after 2 start-up batches per worker, "
        f"super-batches of {args.batch_size}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--pool", default="data/bench/pool", help="the benchmark's shards (64-px PNGs)")
    parser.add_argument("--jpeg-dir", type=Path, default=Path("/tmp/jestclip-loader-jpeg"))
    parser.add_argument("--jpeg-count", type=int, default=2000)
    parser.add_argument("--jpeg-size", type=int, default=256)
    parser.add_argument("--large-jpeg-size", type=int, default=512, help="JPEGs for the loader's draft rows")
    parser.add_argument("--samples", type=int, default=1024, help="images timed per row")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="time limit per row")
    parser.add_argument("--batch-size", type=int, default=64, help="super-batch size of the stream")
    parser.add_argument("--workers", type=ints, default=[0, 1, 2])
    parser.add_argument("--draft-sizes", type=ints, default=[256, 512, 1024])
    parser.add_argument("--draft-count", type=int, default=60, help="JPEGs per size for the decode timing")
    parser.add_argument(
        "--iid-steps-per-s",
        type=float,
        default=IID_STEPS_PER_S,
        help="IID steps/s of ViT-B/16, b = 512, on the GPU (default: an estimate, ~40%% of H100 bf16 peak)",
    )
    parser.add_argument("--jest-steps-per-s", type=float, default=None, help="default: IID / (7/3)")
    parser.add_argument("--flexi-steps-per-s", type=float, default=None, help="default: IID / 1.10")
    parser.add_argument("--quick", action="store_true", help="generated shards, few samples (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jpeg_count, args.samples, args.batch_size = min(args.jpeg_count, 96), 32, 16
        args.max_seconds = min(args.max_seconds, 3.0)
        args.workers, args.draft_sizes, args.draft_count = [0, 1], [256], 4
    args.jest_steps_per_s = args.jest_steps_per_s or args.iid_steps_per_s / JEST_COST
    args.flexi_steps_per_s = args.flexi_steps_per_s or args.iid_steps_per_s / FLEXI_COST
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    per_shard = 250 if not args.quick else 48
    jpeg_urls = write_jpeg_shards(args.jpeg_dir, args.jpeg_count, args.jpeg_size, per_shard)
    print(header(args) + "\n")
    print("| source | transform | workers | images/s | images/s per worker |")
    print("|---|---|---:|---:|---:|", flush=True)
    _, jpeg_rates = loader_rows(args, jpeg_urls)
    per_worker = jpeg_rates.get(1, max(jpeg_rates.values()))
    estimated = args.iid_steps_per_s == IID_STEPS_PER_S
    print(
        f"\nWorkers needed for ViT-B/16 at 224 px, b = {BATCH}, at {per_worker:,.0f} images/s per worker "
        "(the 224-px JPEG row with 1 worker). Steps/s "
        + (
            "are estimates (IID: ~40% of H100 bf16 peak; JEST, Flexi-JEST: the paper's step-cost ratios 7/3 "
            "and 1.10); replace them with the step times benchmarks/gpu.py measures. At f = 0.9 the same "
            "step rate is assumed, so those rows are an upper bound.\n"
            if estimated
            else "as given.\n"
        )
    )
    print("| method | f | images per step | steps/s | images/s needed | workers needed |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(workers_rows(args, per_worker)))
    large = args.large_jpeg_size
    large_urls = write_jpeg_shards(args.jpeg_dir / str(large), args.jpeg_count // 2, large, per_shard)
    print(
        f"\nThe loader on generated {large}-px JPEG q90 through the {TARGET}-px transform (images/s), "
        "decoding "
        f"in full vs at reduced size (decode_size={TARGET}, jestclip train's draft_decode=True):\n"
    )
    print("| workers | full decode | reduced-size decode | speed-up |")
    print("|---:|---:|---:|---:|")
    print(draft_loader_row(args, large_urls), flush=True)
    print(f"\nJPEG decode + {TARGET}-px transform per image, main process, 1 torch thread:\n")
    print(
        "| JPEG size | decode, ms | decode + transform, ms | draft decode, ms (scale) | draft decode + "
        "transform, ms | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(draft_rows(args.draft_sizes, args.draft_count, image_transform("ViT-B-16"))), flush=True)
    blobs = [jpeg_bytes(natural_image(np.random.default_rng(2), args.jpeg_size)) for _ in range(64)]
    print("\n" + gpu_decode_line(blobs))


if __name__ == "__main__":
    main()
