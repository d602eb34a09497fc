"""Training steps/s streaming the shards vs from a memory-resident pool (``data_in_memory=True``).

Runs ``jestclip.train.loop.train`` with the study's recipe (``configs/study.py``: jest-micro at 32 px,
b = 64, one loader worker) on ``--data``, without evaluation or intermediate checkpoints, for IID and for
JEST at f = 0.8 (B = 320, reference embeddings from the cache ``--reference``), each streamed
(``data_in_memory=False``, ``SuperBatchStream`` through one DataLoader worker) and from memory
(``MemoryPool``: decoded once before the first step, served in the main process). Steps/s is timed from the
metrics lines' ``wall_s``, from step ``--warmup`` to the last step (the pool's decoding and the worker's
start-up come before the timed window; the pool's decode time is printed separately). The runs are
interleaved (IID stream, IID memory, JEST stream, JEST memory, then again) ``--repeats`` times, so a change
of load on a shared machine hits both modes alike; each row carries the 1-minute load average before and
after it.

    OMP_NUM_THREADS=1 python benchmarks/pool.py --data data/bench/pool --reference speed-ref
    python benchmarks/pool.py --quick         # generated shards and a cached random reference (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jestclip.report import load_run
from jestclip.train.config import MethodConfig, load_recipe
from jestclip.train.loop import train

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "study.py"


def load() -> float:
    return os.getloadavg()[0]


def run(args: argparse.Namespace, method: str, in_memory: bool, run_dir: Path) -> dict:
    """One run; its steps/s over the timed window, the pool's decode seconds and the load averages."""
    cfg = load_recipe(RECIPE)
    jest = method == "jest"
    cfg = dataclasses.replace(
        cfg,
        run_dir=str(run_dir),
        data=args.data,
        steps=args.steps,
        log_every=args.warmup,
        checkpoint_every=args.steps,
        eval_data=None,
        eval_every=0,
        data_in_memory=in_memory,
        reference_cache=args.reference if jest else None,
        method=MethodConfig(method, batch_size=args.batch_size, n_chunks=16),
        num_workers=1,
    )
    before = load()
    started = time.perf_counter()
    train(cfg, progress=False)
    total = time.perf_counter() - started
    lines = load_run(run_dir).train
    first = next(x for x in lines if x["step"] == args.warmup)
    last = lines[-1]
    rate = (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"])
    return {"rate": rate, "before": before, "after": load(), "total": total, "loop": last["wall_s"]}


def pool_line(args: argparse.Namespace) -> str:
    """The pool's summary line (size, skips, decode seconds) for the study's transform, decoded once here."""
    from jestclip.data import SuperBatchStream
    from jestclip.data.pool import MemoryPool
    from jestclip.models import image_transform

    stream = SuperBatchStream(args.data, batch_size=args.batch_size, transform=image_transform("jest-micro"))
    started = time.perf_counter()
    pool = MemoryPool.from_stream(stream)
    return f"Before the runs, {pool.summary(time.perf_counter() - started)} (load average {load():.2f})."


def quick_data(root: Path) -> str:
    """Generated shards (96 samples of 8-px PNGs), a random jest-micro's embeddings cached as 'speed-ref'."""
    from PIL import Image

    from jestclip.data import Pair, png_bytes, write_shard
    from jestclip.models import create_model
    from jestclip.train.reference import cache_model_embeddings

    urls = []
    for s in range(4):
        pairs = [
            Pair(
                f"q{s}_{i:03d}",
                png_bytes(Image.new("RGB", (8, 8), (i * 9 % 256, s * 60, 99))),
                f"text {s} {i}",
            )
            for i in range(24)
        ]
        path = root / f"{s:05d}.tar"
        write_shard(path, pairs)
        urls.append(str(path))
    torch.manual_seed(0)
    cache_model_embeddings(create_model("jest-micro"), "jest-micro", urls, name="speed-ref")
    return str(root)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/bench/pool", help="the pool's shards")
    parser.add_argument("--reference", default="speed-ref", help="cache name of JEST's reference embeddings")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="b (JEST's B = 5b at f = 0.8)")
    parser.add_argument("--methods", default="iid,jest")
    parser.add_argument("--quick", action="store_true", help="generated shards, few steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch_size = 6, 2, 1, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the study
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.data = quick_data(Path(tmp) / "shards")
        print(
            f"Machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread; "
            f"date {datetime.date.today()}; data {args.data}; {args.steps} steps per run, timed from step "
            f"{args.warmup}; b = {args.batch_size}.\n"
        )
        print(pool_line(args) + "\n")
        print("| repeat | method | data | steps/s | load avg before, after | run s (outside the step loop) |")
        print("|---:|---|---|---:|---|---:|", flush=True)
        rates: dict[tuple[str, bool], list[float]] = {}
        for repeat in range(args.repeats):
            for method in args.methods.split(","):
                for in_memory in (False, True):
                    out = run(args, method, in_memory, Path(tmp) / f"{method}-{in_memory}-{repeat}")
                    rates.setdefault((method, in_memory), []).append(out["rate"])
                    mode = "in memory" if in_memory else "streamed"
                    name = "IID" if method == "iid" else "JEST f = 0.8"
                    print(
                        f"| {repeat + 1} | {name} | {mode} | {out['rate']:.2f} | {out['before']:.2f}, "
                        f"{out['after']:.2f} | {out['total']:.1f} ({out['total'] - out['loop']:.1f}) |",
                        flush=True,
                    )
        print("\n| method | streamed steps/s (median, range) | in memory steps/s (median, range) | ratio |")
        print("|---|---:|---:|---:|")
        for method in args.methods.split(","):
            s, m = rates[(method, False)], rates[(method, True)]
            name = "IID" if method == "iid" else "JEST f = 0.8"
            print(
                f"| {name} | {statistics.median(s):.2f} ({min(s):.2f}–{max(s):.2f}) | "
                f"{statistics.median(m):.2f} ({min(m):.2f}–{max(m):.2f}) | "
                f"{statistics.median(m) / statistics.median(s):.2f}x |"
            )


if __name__ == "__main__":
    main()
