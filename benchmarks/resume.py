"""Resume time: from calling ``train()`` on a run directory with a checkpoint at step N to its first resumed
step, before (the data stream replayed N super-batches) and after (the checkpoint's data position).

A tiny IID run (jest-micro, b = 8, ``num_workers=0``, 1 torch thread) on generated shards (16 shards of 99
64-px PNGs, all readable) is trained 10 steps and checkpointed. The checkpoints of larger N (1,000, 10,000,
100,000) are that checkpoint with its step counter set to N and a fabricated data position: the one an
uninterrupted run would have recorded there, computed without decoding anything (every generated sample is
readable, so after N steps the stream has consumed N·b samples, i.e. ``N·b // 99`` whole shards drawn by the
worker's shard-choice RNG and ``N·b % 99`` samples of the next; checked against the position recorded at
step 10). Model and optimiser are those of step 10: only the data position matters for the time measured.

"Before" is the same checkpoint without its data position: ``resume_batches`` then replays the N
super-batches through the same DataLoader, which is what every resume did before positions were recorded
(``resume_batches`` of commit 0549fb2). Each row reports the seconds from
calling ``train(cfg, stop_after=N + 1)`` to the first ``learn()`` call of the resumed run, and the images
decoded before it; "re-read" is how many samples of its current shard the resumed worker reads from the
tar again (not decoded) to reach its offset.

    python benchmarks/resume.py    # steps 10, 1,000, 10,000 and (no replay) 100,000; ~1 minute on 2 cores
    python benchmarks/resume.py --steps 10 100 --no-replay-above 100   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import jestclip.train.loop as loop
from jestclip.data import Pair, loader, png_bytes, stream, write_shard
from jestclip.train.config import MethodConfig, TrainConfig
from jestclip.train.rundir import RunDir

SHARDS, PER_SHARD, BATCH = 16, 99, 8  # 99: N·b falls inside a shard (N·b % 99 = 80 or 8)


def make_shards(root: Path) -> None:
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        pairs = []
        for i in range(PER_SHARD):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            pairs.append(Pair(f"s{s}_{i:03d}", png_bytes(Image.fromarray(pixels)), f"caption {s} {i}"))
        write_shard(root / f"{s:05d}.tar", pairs)


def config(run_dir: Path, data: Path, stop_after: int | None) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir),
        model="jest-micro",
        data=str(data),
        method=MethodConfig("iid", batch_size=BATCH),
        steps=1_000_000,
        stop_after=stop_after,
        log_every=1_000_000,
        checkpoint_every=1_000_000,
        num_workers=0,
        device="cpu",
    )


def position_after(step: int, urls: list[str], seed: int) -> dict:
    """The data position after ``step`` super-batches of b readable samples (one loader worker, rank 0)."""
    consumed = step * BATCH
    rng = random.Random(f"{seed}/0/0")  # SuperBatchStream's shard-choice RNG of rank 0, worker 0
    for _ in range(consumed // PER_SHARD):
        rng.choice(urls)
    version, state, gauss = rng.getstate()
    url = random.Random()
    url.setstate((version, state, gauss))
    worker = {"worker": 0, "url": url.choice(urls), "sample": consumed % PER_SHARD}
    return {"workers": [{**worker, "rng": [version, list(state), gauss]}], "next": 0}


def checkpoint_at(step: int, base: dict, urls: list[str], run_dir: Path, replay: bool) -> None:
    """A run directory whose newest checkpoint is ``base`` at ``step`` (without data position: ``replay``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    state = {**base, "counters": {**base["counters"], "step": step}}
    state["data"] = None if replay else [position_after(step, urls, base["config"]["seed"])]
    RunDir(run_dir).write_config(base["config"] | {"run_dir": str(run_dir)})
    RunDir(run_dir).save_checkpoint(state)


def time_resume(cfg: TrainConfig) -> tuple[float, int]:
    """Seconds from calling ``train`` to its first ``learn()``, and the images decoded until then."""
    decoded, first = [0], []
    real_decode, real_learn = stream.decode_sample, loop.learn

    def counting(raw, **kwargs):
        decoded[0] += 1
        return real_decode(raw, **kwargs)

    def learn(*args, **kwargs):
        if not first:
            first.append((time.perf_counter(), decoded[0]))
        return real_learn(*args, **kwargs)

    stream.decode_sample, loop.learn = counting, learn
    try:
        start = time.perf_counter()
        loop.train(cfg, progress=False)
    finally:
        stream.decode_sample, loop.learn = real_decode, real_learn
    return first[0][0] - start, first[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/jestclip-resume-bench")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 1_000, 10_000, 100_000])
    parser.add_argument("--no-replay-above", type=int, default=10_000, help="no replay for larger N")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "the checkpoint of step .* records no data position")  # the replay
    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    make_shards(work / "data")
    urls = loader.expand_urls(work / "data")
    loop.train(config(work / "seed-run", work / "data", stop_after=10), progress=False)  # also warms up
    seeded = RunDir(work / "seed-run")
    base = torch.load(seeded.latest_checkpoint(), weights_only=True)
    assert base["data"] == [position_after(10, urls, base["config"]["seed"])], "position_after is wrong"
    rows = []
    for step in args.steps:
        row = {"step": step}
        for mode in ("after", "before"):
            if mode == "before" and step > args.no_replay_above:
                row[mode] = None
                continue
            run_dir = work / f"run-{mode}-{step}"
            checkpoint_at(step, base, urls, run_dir, replay=mode == "before")
            row[mode] = time_resume(config(run_dir, work / "data", stop_after=step + 1))
            seconds, images = row[mode]
            print(f"step {step:>7,} {mode:>6}: {seconds:7.2f} s, {images:,} images decoded", flush=True)
        rows.append(row)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    machine = platform.processor() or platform.machine()
    print(f"\n{datetime.date.today()}, {machine}, torch {torch.__version__}, b = {BATCH}, num_workers=0")
    print("| checkpoint step | before: replay, s | decoded | after: data position, s | decoded | re-read |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        before = f"{row['before'][0]:.2f} | {row['before'][1]:,}" if row["before"] else "— | —"
        after = f"{row['after'][0]:.2f} | {row['after'][1]:,}"
        print(f"| {row['step']:,} | {before} | {after} | {row['step'] * BATCH % PER_SHARD} |")


if __name__ == "__main__":
    main()
