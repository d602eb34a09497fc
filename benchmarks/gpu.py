"""The GPU measurements in one command: CUDA tests, step times per method, where JEST's time goes, selection.

    python benchmarks/gpu.py --out /tmp/gpu.md                      # ViT-B-16, b = 512: ~2.5 min on one H200
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu.md  # smoke test: jest-micro, b = 8

Prints (and writes to ``--out``) a markdown report:

1. ``pytest -q -k cuda tests``: what it collects and how it ends.
2. Step time (median of ``--steps`` after ``--warmup``, ``torch.cuda.synchronize`` around each) of IID,
   JEST and Flexi-JEST: ``jestclip.train.run_step`` + backward + gradient clipping + AdamW under
   ``torch.autocast("cuda", bfloat16)`` (as ``jestclip.train.loop.learn``), randomly initialised model
   (nothing is downloaded), random images and tokens on the device and random normalised embeddings standing
   in for the cached reference; ms and x IID against the targets (JEST <= 2.5x, Flexi-JEST <= 1.3x).
3. A JEST step taken apart: ``score_embeddings``, ``joint_select``, ``batch_score`` and the learning part
   (``run_step`` of IID on the selection + backward + AdamW) timed separately, then profiled with
   ``torch.profiler`` inside ``record_function`` ranges: each op's self CUDA time (CPU time on CPU) goes to
   the range it started in, top ops per range.
4. ``joint_select`` time (median) and peak memory (``torch.cuda.max_memory_allocated``, inputs included) at
   B = 40,960 / 81,920 / 163,840, D = 768, b = B/5, 16 chunks on random normalised embeddings, in float32
   as the library runs it (torch's default matmul precision) and with TF32 matmuls allowed, against the
   targets (<= 150 ms, <= 4 GB at B = 163,840).

A run that does not fit in memory is reported as such in its row, and the rest goes on.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from jestclip.models import create_model
from jestclip.selection import Embeddings, batch_score, joint_select
from jestclip.train import MethodConfig, run_step
from jestclip.train.methods import get_method
from jestclip.train.steps import SuperBatchTensors, score_embeddings

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"jest": 2.5, "flexi-jest": 1.3}  # step time over IID
SELECT_TARGET_MS, SELECT_TARGET_GB = 150.0, 4.0  # at the largest B
PIECES = ("scoring forward", "selection", "batch score", "learning (forward, backward, AdamW)")


@dataclass(frozen=True)
class Settings:
    """What is measured: the model and batch of the step timings, the sizes of the selection timings."""

    model: str
    batch: int
    filter_ratio: float
    select_sizes: tuple[int, ...]
    dim: int
    n_chunks: int
    steps: int
    warmup: int
    select_reps: int


FULL = Settings("ViT-B-16", 512, 0.8, (40960, 81920, 163840), 768, 16, 20, 5, 5)
TINY = Settings("jest-micro", 8, 0.8, (512, 1024, 2048), 768, 16, 3, 1, 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as the training loop), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def pytest_cuda(path: str, timeout: float) -> str:
    """Run ``pytest -q -k cuda PATH`` in a subprocess (offline); its summary line and exit status."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", path]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`pytest -q -k cuda {path}`: stopped after {timeout:.0f} s"
    lines = [ln.strip("= ") for ln in done.stdout.splitlines() if ln.strip()]
    errors = done.stderr.strip().splitlines()
    summary = lines[-1] if lines else (errors[-1] if errors else "no output")
    return f"`pytest -q -k cuda {path}`: {summary} (exit status {done.returncode})"


def random_embeddings(n: int, dim: int, device: torch.device, generator: torch.Generator) -> Embeddings:
    """L2-normalised ``[n, dim]`` image and text embeddings whose pairs agree somewhat (like a model's)."""
    image = F.normalize(torch.randn(n, dim, device=device, generator=generator), dim=1)
    text = F.normalize(image + torch.randn(n, dim, device=device, generator=generator), dim=1)
    return Embeddings(image, text, 10.0, -10.0)


def make_batch(s: Settings, n: int, device: torch.device, generator: torch.Generator) -> SuperBatchTensors:
    """``n`` random images and tokens of the model's sizes, with random reference embeddings."""
    cfg = open_clip.get_model_config(s.model)
    size, text = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]
    images = torch.randn(n, 3, size, size, device=device, generator=generator)
    shape = (n, text["context_length"])
    tokens = torch.randint(1, text["vocab_size"], shape, device=device, generator=generator)
    return SuperBatchTensors(images, tokens, random_embeddings(n, cfg["embed_dim"], device, generator))


def method_config(s: Settings, method: str) -> MethodConfig:
    return MethodConfig(method, batch_size=s.batch, n_chunks=s.n_chunks)


def super_batch(s: Settings, method: str) -> int:
    return get_method(method).super_batch(s.batch, s.filter_ratio)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator,
) -> None:
    """One step as ``loop.learn`` takes it: the method step under autocast, backward, clipping, AdamW."""
    with autocast(batch.images.device):
        output = run_step(model, batch, cfg, generator)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def median_ms(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in ms over ``steps`` calls after ``warmup``, synchronised around each."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@contextlib.contextmanager
def out_of_memory(note: list[str]) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into a note (and free what it can) instead of ending the run."""
    try:
        yield
    except torch.OutOfMemoryError as exn:
        note.append(f"out of memory ({str(exn).splitlines()[0][:80]})")
        torch.cuda.empty_cache()


def step_rows(s: Settings, model: torch.nn.Module, device: torch.device) -> list[str]:
    """Step time of each method, ms and x IID, against the targets."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device).manual_seed(0)
    times: dict[str, float] = {}
    rows = []
    for method in ("iid", "jest", "flexi-jest"):
        cfg, n, note = method_config(s, method), super_batch(s, method), []
        with out_of_memory(note):
            batch = make_batch(s, n, device, generator)
            step = lambda: train_step(model, optimizer, batch, cfg, generator)  # noqa: B023, E731
            times[method] = median_ms(step, device, s.steps, s.warmup)
        batch = None
        if note:
            rows.append(f"| {method} | {n:,} | {note[0]} | | |")
            continue
        ratio = times[method] / times["iid"] if "iid" in times else float("nan")
        target = TARGETS.get(method)
        verdict = "—" if target is None else f"<= {target}x: {'yes' if ratio <= target else 'NO'}"
        rows.append(f"| {method} | {n:,} | {times[method]:,.1f} | {ratio:.2f}x | {verdict} |")
    return rows


Piece = tuple[str, Callable[[], None]]


def jest_pieces(
    s: Settings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: SuperBatchTensors,
    generator: torch.Generator,
) -> list[Piece]:
    """A JEST step (``select_and_learn_step`` + backward + AdamW) as four calls, named as in ``PIECES``."""
    cfg = method_config(s, "jest")
    learn_cfg = MethodConfig("iid", batch_size=s.batch, loss=cfg.loss)
    device, state = batch.images.device, {}

    def scoring() -> None:
        with autocast(device):
            state["learner"] = score_embeddings(model, batch, None)

    def selection() -> None:
        with autocast(device):
            state["selected"] = joint_select(
                state["learner"],
                batch.reference,
                size=s.batch,
                n_chunks=min(cfg.n_chunks, s.batch),
                scoring=cfg.scoring,
                loss=cfg.loss,
                gain=cfg.gain,
                generator=generator,
            )

    def score() -> None:
        float(batch_score(state["learner"], batch.reference, state["selected"], scoring=cfg.scoring))

    def learning() -> None:
        chosen = state["selected"]
        train_step(
            model,
            optimizer,
            SuperBatchTensors(batch.images[chosen], batch.tokens[chosen]),
            learn_cfg,
            generator,
        )

    return list(zip(PIECES, (scoring, selection, score, learning), strict=True))


def piece_times(pieces: list[Piece], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median ms of each piece, run in step order and synchronised around each."""
    times: dict[str, list[float]] = {name: [] for name, _ in pieces}
    for i in range(warmup + steps):
        for name, fn in pieces:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def profile_pieces(pieces: list[Piece], device: torch.device, steps: int) -> dict[str, dict[str, float]]:
    """Self CUDA (on CPU: CPU) time in ms per step of each op, by the ``record_function`` range it ran in."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            for name, fn in pieces:
                with record_function(name):
                    fn()
                    sync(device)
    return attribute(prof.events(), device.type == "cuda", steps)


def attribute(events: list, cuda: bool, steps: int) -> dict[str, dict[str, float]]:
    """Each CPU-side op's self time goes to the range its start falls in (the backward pass runs in another
    thread on CUDA, but inside the learning range's time): {range: {op: ms per step}}."""
    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PIECES)
    starts = [r[0] for r in ranges]
    out: dict[str, dict[str, float]] = {name: {} for name in PIECES}
    for event in events:
        if event.name in PIECES or getattr(event.device_type, "name", "CPU") != "CPU":
            continue
        if not cuda:
            us = event.self_cpu_time_total
        elif hasattr(event, "self_device_time_total"):
            us = event.self_device_time_total
        else:  # torch < 2.4
            us = event.self_cuda_time_total
        at = bisect.bisect_right(starts, event.time_range.start) - 1
        if us and at >= 0 and event.time_range.start <= ranges[at][1]:
            ops = out[ranges[at][2]]
            ops[event.name] = ops.get(event.name, 0.0) + us / 1000 / steps
    return out


def breakdown_rows(s: Settings, model: torch.nn.Module, device: torch.device, top: int = 4) -> list[str]:
    """JEST's step taken apart: each piece's median time alone, its profiled time and its top ops."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device).manual_seed(1)
    note: list[str] = []
    with out_of_memory(note):
        batch = make_batch(s, super_batch(s, "jest"), device, generator)
        pieces = jest_pieces(s, model, optimizer, batch, generator)
        alone = piece_times(pieces, device, s.steps, s.warmup)
        ops = profile_pieces(pieces, device, steps=min(3, s.steps))
    if note:
        return [f"| JEST step | {note[0]} | | | |"]
    total = sum(alone.values())
    rows = []
    for name in PIECES:
        best = sorted(ops[name].items(), key=lambda kv: -kv[1])[:top]
        listed = ", ".join(f"`{op}` {ms:,.1f}" for op, ms in best)
        rows.append(
            f"| {name} | {alone[name]:,.1f} | {100 * alone[name] / total:.0f}% | "
            f"{sum(ops[name].values()):,.1f} | {listed} |"
        )
    rows.append(f"| sum | {total:,.1f} | 100% | | |")
    return rows


def time_selection(n: int, s: Settings, device: torch.device, tf32: bool) -> tuple[float, int | None]:
    """Median ms of ``joint_select`` at B = n and its peak allocated bytes over what was allocated before its
    inputs (so the inputs count; CUDA only)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        generator = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        learner = random_embeddings(n, s.dim, device, generator)
        reference = random_embeddings(n, s.dim, device, generator)
        size = round(n * (1 - s.filter_ratio))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def select() -> None:
            joint_select(learner, reference, size=size, n_chunks=s.n_chunks, generator=generator)

        ms = median_ms(select, device, s.select_reps, 1)
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return ms, peak


def selection_rows(s: Settings, device: torch.device) -> list[str]:
    """``joint_select`` time and peak memory per B, in float32 and (CUDA) with TF32 matmuls allowed."""
    modes = [("float32", False)] + ([("TF32 allowed", True)] if device.type == "cuda" else [])
    rows = []
    for n in s.select_sizes:
        for label, tf32 in modes:
            note: list[str] = []
            with out_of_memory(note):
                ms, peak = time_selection(n, s, device, tf32)
            inputs = f"{4 * n * s.dim * 4 / 1e9:.2f} GB"
            if note:
                rows.append(
                    f"| {n:,} | {round(n * (1 - s.filter_ratio)):,} | {label} | {note[0]} | | {inputs} | |"
                )
                continue
            memory = f"{peak / 1e9:.2f} GB" if peak is not None else "n/a (CPU)"
            verdict = "—"
            if n == max(s.select_sizes) and peak is not None:
                fits = ms <= SELECT_TARGET_MS and peak <= SELECT_TARGET_GB * 1e9
                target = f"<= {SELECT_TARGET_MS:.0f} ms and <= {SELECT_TARGET_GB:.0f} GB"
                verdict = f"{target}: {'yes' if fits else 'NO'}"
            size = round(n * (1 - s.filter_ratio))
            rows.append(f"| {n:,} | {size:,} | {label} | {ms:,.1f} | {memory} | {inputs} | {verdict} |")
    return rows


class Report:
    """Markdown sections, printed as they are made and rewritten to ``out`` after each."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.parts = out, []

    def add(self, *lines: str) -> None:
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        self.parts.append(text)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.parts))


def header(s: Settings, device: torch.device, argv: list[str]) -> list[str]:
    return [
        f"### {device_name(device)} — {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/gpu.py {' '.join(argv)}` · torch {torch.__version__} · open_clip "
        f"{open_clip.__version__} · model {s.model} (random init), b = {s.batch}, f = {s.filter_ratio}, "
        f"{s.n_chunks} chunks.",
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="jest-micro, b = 8, B <= 2,048 (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--steps", type=int, help="timed steps per method (median)")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument(
        "--select-sizes",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="super-batch sizes B of the joint_select timing (default 40960,81920,163840; tiny: up to 2048)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="open_clip's, to save memory")
    parser.add_argument("--pytest-path", default="tests", help="where `pytest -k cuda` looks")
    parser.add_argument("--pytest-timeout", type=float, default=180.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip: no pretrained weights loaded
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu --tiny)")
    s = TINY if args.tiny else FULL
    s = Settings(
        **{
            **s.__dict__,
            "steps": s.steps if args.steps is None else args.steps,
            "warmup": s.warmup if args.warmup is None else args.warmup,
            "select_sizes": args.select_sizes or s.select_sizes,
        }
    )
    if s.steps < 1 or s.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} and {s.warmup}")
    report = Report(args.out)
    report.add(*header(s, device, argv))
    report.add("**CUDA tests.** " + pytest_cuda(args.pytest_path, args.pytest_timeout))
    torch.manual_seed(0)
    model = create_model(s.model, device=device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    report.add(
        f"**Step time**, median of {s.steps} after {s.warmup} warm-up (run_step + backward + clip + AdamW"
        f"{', bf16 autocast' if device.type == 'cuda' else ''}):",
        "",
        "| method | images per step | ms | x IID | target |",
        "|---|---:|---:|---:|---|",
        *step_rows(s, model, device),
    )
    unit = "CUDA" if device.type == "cuda" else "CPU"
    report.add(
        f"**Where a JEST step's time goes**: each piece timed alone (median of {s.steps}), then profiled; "
        f"op times are self {unit} time in ms per step.",
        "",
        f"| part | ms | share | profiled {unit} ms | top ops by {unit} time |",
        "|---|---:|---:|---:|---|",
        *breakdown_rows(s, model, device),
    )
    model = None
    report.add(
        f"**joint_select**, D = {s.dim}, b = B/5, {s.n_chunks} chunks, random normalised embeddings, median "
        f"of {s.select_reps} after 1 warm-up; peak = max allocated, inputs (4 x B x D float32) included:",
        "",
        "| B | b | matmul precision | ms | peak memory | inputs | target |",
        "|---:|---:|---|---:|---:|---:|---|",
        *selection_rows(s, device),
    )


if __name__ == "__main__":
    main()
