"""The GPU measurements in one command: CUDA tests, step times, where JEST's time goes, selection, agreement.

    python benchmarks/gpu.py --out /tmp/gpu.md                      # ViT-B-16, b = 512: see below for time
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu.md  # smoke test: jest-micro, b = 8

Prints (and writes to ``--out``) a markdown report, one section per ``--parts`` entry:

1. ``tests``: ``pytest -q -k cuda tests``, what it collects and how it ends (``tests/test_cuda.py``, the
   fused kernel's GPU tests among them).
2. ``steps``: step time (median of ``--steps`` after ``--warmup``, ``torch.cuda.synchronize`` around each) of
   IID, JEST and Flexi-JEST: ``jestclip.train.run_step`` + backward + gradient clipping + AdamW under
   ``torch.autocast("cuda", bfloat16)`` (as ``jestclip.train.loop.learn``), randomly initialised model
   (nothing is downloaded), random images and tokens on the device and random normalised embeddings standing
   in for the cached reference; ms and x IID against the targets (JEST <= 2.5x, Flexi-JEST <= 1.3x).
3. ``breakdown``: a JEST step taken apart: ``score_embeddings``, ``joint_select``, ``batch_score`` and the
   learning part timed separately, then profiled with ``torch.profiler`` inside ``record_function`` ranges.
4. ``selection``: ``joint_select`` time (median) and peak memory (``torch.cuda.max_memory_allocated``, inputs
   included) at B = 40,960 / 81,920 / 163,840, D = 768, b = B/5, 16 chunks on random normalised embeddings,
   sigmoid loss, for: the literal pseudocode (``benchmarks/selection.py``'s Algorithm 1, its own process),
   the torch path in float32 and with TF32 matmuls allowed, and the fused kernel at each operand precision
   (``triton-fp32``, ``-tf32``, ``-bf16``, ``-bf16x3``); then the softmax loss at the largest B (no literal).
   Targets: <= 10 ms at B = 40,960; <= 100 ms and <= 3 GB at B = 163,840.
5. ``agreement``: ``jestclip.selection.agreement.selection_agreement`` of each fused precision against the
   torch path in float32 (TF32 off), both losses, at ``--agreement-sizes``, on two inputs (both models at
   logit scale 10; the reference at scale 100, a trained model's), over 3 seeds; then which backend the rule
   of docs/selection.md picks per loss (``choose_default``, with the times of part 4). On the CPU the fused
   precisions are measured through their torch emulation (``emulated-*``) and no backend is picked.

6. ``speed``: the step's speed switches (``jestclip.train.speed``): IID, JEST and Flexi-JEST step times
   under each of ``--variants`` (``SPEED_VARIANTS``: bf16 autocast as before; the bf16 scoring copy; that
   and ``torch.compile`` of both transformers), a fresh model each, with the step's model FLOPs per second
   against the card's dense bf16 peak (``BF16_PEAK_TFLOPS``); then the small model's IID steps per second
   by compile mode (``--small-compile``; ``reduce-overhead`` is CUDA graphs). Targets: IID >= 45% of peak,
   JEST <= 2.67x, Flexi-JEST <= 1.35x, jest-small (64 px, b = 256) >= 40 steps/s. Not part of the first
   device call's time: run it as its own call (``--parts speed``).

A run that does not fit in memory is reported as such in its row, and the rest goes on. On the CPU the
``triton-*`` rows run only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, not a speed).

Time: parts 1-4 without the fused rows took ~2.5 min on one H200 (2026-11-30); the whole command is not yet
timed (estimated 5-7 min: compiling and autotuning the kernel, the literal's processes, the agreement runs),
so the prepared device command (docs/benchmarks.md, "The fused selection kernel and the step's speed
switches (issue 28)") stops it at
9 minutes and ``--parts`` reruns what did not finish. It carries the wheels of open_clip_torch, timm,
webdataset, ftfy, wcwidth, regex, braceexpand and resvg-py in ``.whl`` (the image has torch and Triton).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import json
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
from jestclip.selection.agreement import Agreement, choose_default, selection_agreement
from jestclip.selection.fused import PRECISIONS, triton_available
from jestclip.train import MethodConfig
from jestclip.train.config import TrainConfig
from jestclip.train.loop import learn
from jestclip.train.methods import get_method
from jestclip.train.speed import COMPILE_MODES, ScoringCopy, SpeedConfig, prepare_learner
from jestclip.train.startup import Counters, Placement, StepCosts, TrainState
from jestclip.train.steps import SuperBatchTensors, score_embeddings

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"jest": 2.5, "flexi-jest": 1.3}  # step time over IID
SELECT_TARGETS_MS = {40960: 10.0, 163840: 100.0}  # issue 28, with the default backend
SELECT_TARGET_GB = 3.0  # peak at B = 163,840, inputs included
FUSED = tuple(f"triton-{p}" for p in PRECISIONS)
IMPLEMENTATIONS = ("literal", "torch", "torch-tf32", *FUSED)  # what part 4 times
PARTS = ("tests", "steps", "breakdown", "selection", "agreement", "speed")
# part 6: the step's speed switches (train.speed), each on a fresh model; "before" is what runs did until them
SPEED_VARIANTS = {
    "before": SpeedConfig(),
    "bf16-scoring": SpeedConfig(bf16_scoring=True),
    "bf16-scoring+compile": SpeedConfig(bf16_scoring=True, compile="default"),
}
SMALL_COMPILE = ("off", "default", "reduce-overhead")  # part 6's small-model rows, bf16 autocast each
IID_PEAK_TARGET = 0.45  # ViT-B/16 IID at >= 45% of the card's dense bf16 peak (issue 28)
SMALL_TARGET = 40.0  # jest-small, 64 px, b = 256: IID steps per second
SPEED_TARGETS = {"jest": 2.67, "flexi-jest": 1.35}  # x IID, issue 28
# dense (not sparse) bf16 tensor-core peak by the NVIDIA datasheets, TFLOP/s: the first name found in the
# device's name counts (PCIe before the SXM H100)
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
# part 5's inputs: (learner's, reference's) logit scale, bias -10 for both
AGREEMENT_INPUTS = {"scale 10": (10.0, 10.0), "reference at scale 100": (10.0, 100.0)}
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
    agreement_sizes: tuple[int, ...]
    seeds: int

    small_model: str = "jest-small"
    small_batch: int = 256


FULL = Settings("ViT-B-16", 512, 0.8, (40960, 81920, 163840), 768, 16, 20, 5, 5, (40960, 163840), 3)
TINY = Settings("jest-micro", 8, 0.8, (512, 1024, 2048), 768, 16, 3, 2, 2, (256,), 2, "jest-micro", 8)


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


def random_embeddings(
    n: int, dim: int, device: torch.device, generator: torch.Generator, scale: float = 10.0
) -> Embeddings:
    """L2-normalised ``[n, dim]`` image and text embeddings whose pairs agree somewhat (like a model's),
    logit ``scale``, bias -10."""
    image = F.normalize(torch.randn(n, dim, device=device, generator=generator), dim=1)
    text = F.normalize(image + torch.randn(n, dim, device=device, generator=generator), dim=1)
    return Embeddings(image, text, scale, -10.0)


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
    speed: SpeedConfig | None = None,
    scoring_copy: ScoringCopy | None = None,
) -> None:
    """One training step as a run takes it: the library's ``loop.learn`` (the method step under autocast,
    backward, clipping at the run's ``optim.grad_clip``, the optimiser update), on this model and
    optimiser, with the run's ``speed`` switches (the bf16 scoring copy, when on, is ``scoring_copy``)."""
    device = batch.images.device
    run = TrainConfig(model="bench", method=cfg, device=str(device), speed=speed or SpeedConfig())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = TrainState(model, optimizer, scheduler, generator, Counters(), scoring_copy=scoring_copy)
    learned = learn(state, batch, run, Placement(device))
    if learned.bad is not None:
        raise RuntimeError(f"the benchmark's {cfg.method} step was skipped: {learned.bad}")


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


def bf16_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s (``BF16_PEAK_TFLOPS``), None when unknown (or the CPU)."""
    name = device_name(device)
    peak = next((tf for key, tf in BF16_PEAK_TFLOPS.items() if key in name), None)
    return None if peak is None or device.type != "cuda" else peak * 1e12


def speed_model(
    name: str, speed: SpeedConfig, device: torch.device
) -> tuple[torch.nn.Module, ScoringCopy | None]:
    """A fresh randomly initialised model with ``speed``'s scoring copy and compilation
    (``speed.prepare_learner``, as a run builds them)."""
    torch.manual_seed(0)
    model = create_model(name, device=device)
    return model, prepare_learner(model, speed, selects=True)


def speed_rows(s: Settings, device: torch.device, variants: dict[str, SpeedConfig]) -> list[str]:
    """Step time of IID, JEST and Flexi-JEST under each speed variant (a fresh model each; the warm-up steps
    compile), x IID of the same variant against issue 28's targets, and the step's model FLOPs (appendix
    A.4, ``StepCosts``) per second against the card's dense bf16 peak."""
    peak, rows = bf16_peak(device), []
    for variant, speed in variants.items():
        model, copy = speed_model(s.model, speed, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator(device).manual_seed(0)
        times: dict[str, float] = {}
        for method in ("iid", "jest", "flexi-jest"):
            cfg, n, note = method_config(s, method), super_batch(s, method), []
            flops = StepCosts.measure(TrainConfig(model=s.model, method=cfg), model).total(n)
            with out_of_memory(note):
                batch = make_batch(s, n, device, generator)
                step = lambda: train_step(model, optimizer, batch, cfg, generator, speed, copy)  # noqa: B023, E731
                times[method] = median_ms(step, device, s.steps, s.warmup)
            batch = None
            if note:
                rows.append(f"| {variant} | {method} | {n:,} | {note[0]} | | | | |")
                continue
            ms = times[method]
            ratio = ms / times["iid"] if "iid" in times else float("nan")
            rate = flops / (ms / 1000)
            share = f"{100 * rate / peak:.1f}%" if peak else "—"
            if method == "iid":
                verdict = f">= {100 * IID_PEAK_TARGET:.0f}% of peak: " + (
                    "—" if not peak else "yes" if rate >= IID_PEAK_TARGET * peak else "NO"
                )
            else:
                verdict = f"<= {SPEED_TARGETS[method]}x: {'yes' if ratio <= SPEED_TARGETS[method] else 'NO'}"
            rows.append(
                f"| {variant} | {method} | {n:,} | {ms:,.1f} | {ratio:.2f}x | {rate / 1e12:.3g} | {share} "
                f"| {verdict} |"
            )
        model = copy = optimizer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def small_rows(
    s: Settings, device: torch.device, modes: tuple[str, ...], backend: str = "inductor"
) -> list[str]:
    """IID steps per second of the small model at its own input size, b = ``s.small_batch``, under each
    compile mode (``reduce-overhead``: CUDA graphs), against issue 28's target."""
    small = Settings(**{**s.__dict__, "model": s.small_model, "batch": s.small_batch})
    rows = []
    for mode in modes:
        speed = SpeedConfig(compile=mode, compile_backend=backend)
        model, _ = speed_model(small.model, speed, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator(device).manual_seed(0)
        note: list[str] = []
        with out_of_memory(note):
            batch = make_batch(small, small.batch, device, generator)
            cfg = method_config(small, "iid")
            step = lambda: train_step(model, optimizer, batch, cfg, generator, speed)  # noqa: B023, E731
            ms = median_ms(step, device, small.steps, max(small.warmup, 3))  # CUDA graphs record on call 3
        if note:
            rows.append(f"| {mode} | {note[0]} | | |")
            continue
        rate = 1000 / ms
        verdict = f">= {SMALL_TARGET:.0f}/s: {'yes' if rate >= SMALL_TARGET else 'NO'}"
        rows.append(f"| {mode} | {ms:,.2f} | {rate:,.1f} | {verdict} |")
        model = optimizer = batch = None
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


def time_selection(
    n: int, s: Settings, device: torch.device, impl: str, loss: str = "sigmoid"
) -> tuple[float, int | None]:
    """Median ms of ``joint_select`` at B = n with ``impl`` (``torch``, ``torch-tf32``: the torch path with
    TF32 matmuls allowed, or a ``triton-*`` backend) and its peak allocated bytes over what was allocated
    before its inputs (so the inputs count; CUDA only). The warm-up call compiles and autotunes the kernel."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = impl == "torch-tf32"
    backend = "torch" if impl == "torch-tf32" else impl
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
            joint_select(
                learner,
                reference,
                size=size,
                n_chunks=s.n_chunks,
                loss=loss,
                generator=generator,
                backend=backend,
            )

        ms = median_ms(select, device, s.select_reps, 1)
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return ms, peak


def time_literal(n: int, s: Settings, device: torch.device, timeout: float = 240.0) -> dict:
    """``benchmarks/selection.py``'s literal Algorithm 1 at B = n in its own process (a B x B out-of-memory
    kills only it): its JSON line (``time_s``, ``peak_bytes`` over its inputs, ``selected``, ``distinct``)
    or ``{"error": last line}``."""
    command = [sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--worker", "literal", str(n)]
    command += ["--device", device.type, "--dim", str(s.dim), "--reps", str(s.select_reps)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": ("out of memory" if "out of memory" in last.lower() else last)[:100]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def can_run(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` here, or None."""
    if impl.startswith("triton-"):
        if not triton_available():
            return "Triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA (or TRITON_INTERPRET=1)"
    if impl == "torch-tf32" and device.type != "cuda":
        return "CUDA only"
    return None


def selection_verdict(n: int, ms: float, peak: int | None, largest: int) -> str:
    """The issue's targets at B = 40,960 (time) and B = 163,840 (time and memory); — elsewhere."""
    target = SELECT_TARGETS_MS.get(n)
    if target is None or peak is None:
        return "—"
    fits = ms <= target
    label = f"<= {target:.0f} ms"
    if n == largest:
        fits = fits and peak <= SELECT_TARGET_GB * 1e9
        label += f", <= {SELECT_TARGET_GB:.0f} GB"
    return f"{label}: {'yes' if fits else 'NO'}"


def selection_rows(
    s: Settings, device: torch.device, impls: tuple[str, ...]
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Part 4's table rows, and {loss: {backend: ms at the largest B}} for ``choose_default``
    (``torch`` is the float32 torch path; TF32 and the literal are not backends)."""
    rows: list[str] = []
    times: dict[str, dict[str, float]] = {"sigmoid": {}, "softmax": {}}
    largest = max(s.select_sizes)
    for loss, sizes in (("sigmoid", s.select_sizes), ("softmax", (largest,))):
        for n in sizes:
            size = round(n * (1 - s.filter_ratio))
            inputs = f"{4 * n * s.dim * 4 / 1e9:.2f} GB"
            for impl in impls:
                if impl == "literal" and loss == "softmax":
                    continue
                lead = f"| {loss} | {n:,} | {size:,} | {impl} |"
                why = can_run(impl, device)
                if why is not None:
                    rows.append(f"{lead} {why} | | | {inputs} | |")
                    continue
                if impl == "literal":
                    result = time_literal(n, s, device)
                    if "error" in result:
                        rows.append(f"{lead} {result['error']} | | | {inputs} | |")
                        continue
                    ms, picks = 1000 * result["time_s"], f"{result['selected']:,} ({result['distinct']:,})"
                    peak = result["peak_bytes"] + 4 * n * s.dim * 4 if device.type == "cuda" else None
                else:
                    note: list[str] = []
                    with out_of_memory(note):
                        ms, peak = time_selection(n, s, device, impl, loss)
                    if note:
                        rows.append(f"{lead} {note[0]} | | | {inputs} | |")
                        continue
                    picks = f"{size:,} ({size:,})"
                    if n == largest and impl != "torch-tf32":
                        times[loss][impl] = ms
                memory = f"{peak / 1e9:.2f} GB" if peak is not None else "n/a (CPU)"
                verdict = selection_verdict(n, ms, peak, largest) if loss == "sigmoid" else "—"
                rows.append(f"{lead} {ms:,.1f} | {picks} | {memory} | {inputs} | {verdict} |")
    return rows, times


def agreement_backends(device: torch.device) -> list[str]:
    """The fused precisions on CUDA; on the CPU their torch emulations (fp32's is the torch path itself)."""
    if device.type == "cuda":
        return list(FUSED) if triton_available() else []
    return [f"emulated-{p}" for p in PRECISIONS if p != "fp32"]


def agreement_cells(r: Agreement) -> str:
    """The cells of one Agreement, from the backend to whether it qualifies."""
    return (
        f"{r.backend} | {r.same_picks:.4f} ({r.min_same_picks:.4f}) | {r.same_chunks} of {r.n_chunks} | "
        f"{r.noise_picks:.4f} | {r.max_error:.3g} | {r.relative_error:.2g} | {r.logit_error:.3g} | "
        f"{'yes' if r.qualifies else 'no'}"
    )


def agreement_rows(s: Settings, device: torch.device) -> tuple[list[str], dict[str, list[Agreement]]]:
    """Part 5's table rows and {loss: every Agreement measured for it}."""
    rows: list[str] = []
    measured: dict[str, list[Agreement]] = {"sigmoid": [], "softmax": []}
    backends = agreement_backends(device)
    if not backends:
        return ["| — | — | — | no fused backend here (Triton is not installed) | | | | | | | |"], measured
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the baseline is float32
    try:
        for loss in ("sigmoid", "softmax"):
            for label, (learner_scale, reference_scale) in AGREEMENT_INPUTS.items():
                for n in s.agreement_sizes:
                    generator = torch.Generator(device).manual_seed(n)
                    learner = random_embeddings(n, s.dim, device, generator, learner_scale)
                    reference = random_embeddings(n, s.dim, device, generator, reference_scale)
                    note: list[str] = []
                    with out_of_memory(note):
                        found = selection_agreement(
                            learner,
                            reference,
                            size=round(n * (1 - s.filter_ratio)),
                            backends=backends,
                            n_chunks=s.n_chunks,
                            loss=loss,
                            seeds=range(s.seeds),
                        )
                    if note:
                        rows.append(f"| {loss} | {label} | {n:,} | {note[0]} | | | | | | | |")
                        continue
                    measured[loss] += found
                    rows += [f"| {loss} | {label} | {n:,} | {agreement_cells(r)} |" for r in found]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return rows, measured


def decision_lines(
    measured: dict[str, list[Agreement]],
    times: dict[str, dict[str, float]],
    largest: int,
    device: torch.device,
) -> list[str]:
    """Per loss, the backend ``choose_default`` picks from the agreement rows and the times at B = largest."""
    if device.type != "cuda":
        return ["No default is picked on the CPU: it measures the precisions' emulation, not the kernel."]
    lines = []
    for loss in ("sigmoid", "softmax"):
        timed = {b: ms for b, ms in times.get(loss, {}).items() if b == "torch" or b.startswith("triton-")}
        if not measured.get(loss) or not timed:
            lines.append(f"- {loss}: not measured in this run (parts selection and agreement both needed)")
            continue
        pick = choose_default(measured[loss], timed)
        if pick is None:
            lines.append(f"- {loss}: no timed backend qualifies; keep `torch`")
        else:
            lines.append(
                f"- {loss}: the rule picks `{pick}` ({timed[pick]:,.1f} ms at B = {largest:,}): "
                f"`CUDA_DEFAULT_BACKEND[{loss!r}]` in `src/jestclip/selection/fused.py`"
            )
    return lines


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


def csv(kind: type) -> Callable[[str], tuple]:
    return lambda text: tuple(kind(x) for x in text.split(","))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="jest-micro, b = 8, B <= 2,048 (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--parts", type=csv(str), default=PARTS, help=f"any of {','.join(PARTS)} (all)")
    parser.add_argument("--steps", type=int, help="timed steps per method (median)")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument(
        "--select-sizes",
        type=csv(int),
        help="super-batch sizes B of the joint_select timing (default 40960,81920,163840; tiny: up to 2048)",
    )
    parser.add_argument(
        "--implementations",
        type=csv(str),
        default=IMPLEMENTATIONS,
        help=f"what the selection part times, of {','.join(IMPLEMENTATIONS)} (all)",
    )
    parser.add_argument(
        "--agreement-sizes", type=csv(int), help="B of the agreement table (default 40960,163840; tiny: 256)"
    )
    parser.add_argument(
        "--dim", type=int, help="embedding width D of the selection and agreement parts (768)"
    )
    parser.add_argument(
        "--variants",
        type=csv(str),
        default=tuple(SPEED_VARIANTS),
        help=f"what the speed part times, of {','.join(SPEED_VARIANTS)} (all)",
    )
    parser.add_argument(
        "--small-compile",
        type=csv(str),
        default=SMALL_COMPILE,
        help=f"compile modes of the speed part's small-model rows (default {','.join(SMALL_COMPILE)})",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend of the speed part's compiled rows (aot_eager: the CPU smoke test's)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="open_clip's, to save memory")
    parser.add_argument("--pytest-path", default="tests", help="where `pytest -k cuda` looks")
    parser.add_argument("--pytest-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    for name, given, known in (
        ("--parts", args.parts, PARTS),
        ("--implementations", args.implementations, IMPLEMENTATIONS),
        ("--variants", args.variants, tuple(SPEED_VARIANTS)),
        ("--small-compile", args.small_compile, COMPILE_MODES),
    ):
        unknown = [x for x in given if x not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {','.join(known)}")
    return args


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
            "agreement_sizes": args.agreement_sizes or s.agreement_sizes,
            "dim": args.dim or s.dim,
        }
    )
    if s.steps < 1 or s.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} and {s.warmup}")
    parts = set(args.parts)
    report = Report(args.out)
    report.add(*header(s, device, argv))
    if "tests" in parts:
        report.add("**CUDA tests.** " + pytest_cuda(args.pytest_path, args.pytest_timeout))
    if parts & {"steps", "breakdown"}:
        torch.manual_seed(0)
        model = create_model(s.model, device=device)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if "steps" in parts:
            report.add(
                f"**Step time**, median of {s.steps} after {s.warmup} warm-up (run_step + backward + clip + "
                f"AdamW{', bf16 autocast' if device.type == 'cuda' else ''}):",
                "",
                "| method | images per step | ms | x IID | target |",
                "|---|---:|---:|---:|---|",
                *step_rows(s, model, device),
            )
        if "breakdown" in parts:
            unit = "CUDA" if device.type == "cuda" else "CPU"
            report.add(
                f"**Where a JEST step's time goes**: each piece timed alone (median of {s.steps}), then "
                f"profiled; op times are self {unit} time in ms per step.",
                "",
                f"| part | ms | share | profiled {unit} ms | top ops by {unit} time |",
                "|---|---:|---:|---:|---|",
                *breakdown_rows(s, model, device),
            )
        model = None
    times: dict[str, dict[str, float]] = {}
    if "selection" in parts:
        rows, times = selection_rows(s, device, tuple(args.implementations))
        report.add(
            f"**joint_select**, D = {s.dim}, b = B/5, {s.n_chunks} chunks, random normalised embeddings "
            f"(scale 10, bias -10), median of {s.select_reps} after 1 warm-up (which compiles and autotunes "
            "the kernel); peak = max allocated, inputs (4 x B x D float32) included; literal = Algorithm 1 "
            "as written (`benchmarks/selection.py`, its own process and inputs; picks with replacement):",
            "",
            "| loss | B | b | implementation | ms | picks (distinct) | peak memory | inputs | target |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|",
            *rows,
        )
    if "agreement" in parts:
        rows, measured = agreement_rows(s, device)
        report.add(
            "**Agreement with float32** (`selection_agreement`, the torch path in float32 as baseline, TF32 "
            f"off): b = B/5, {s.n_chunks} chunks, gain 100, {s.seeds} seeds (each backend shares each seed's "
            "Gumbel noise with the baseline). Same picks: share of the float32 picks kept, mean (min) over "
            "seeds; leading chunks: how many first chunks are identical in every seed; a redraw keeps: the "
            "share float32 keeps of itself under another seed's noise; score errors along float32's chunks, "
            "largest absolute, over the scores' standard deviation, and times the gain (Gumbel units). "
            "Qualifies: changes at most a tenth of the picks a redraw changes.",
            "",
            "| loss | inputs | B | backend | same picks | leading chunks | a redraw keeps | max score error "
            "| / spread | x gain | qualifies |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
            *rows,
        )
        largest = max(s.select_sizes)
        report.add(
            "**The CUDA default by the rule** (docs/selection.md): the fastest backend at the largest B "
            "that qualifies on every agreement row of its loss:",
            "",
            *decision_lines(measured, times, largest, device),
        )

    if "speed" in parts:
        variants = {
            name: dataclasses.replace(SPEED_VARIANTS[name], compile_backend=args.compile_backend)
            for name in args.variants
        }
        unit = "dense bf16 peak" if bf16_peak(device) else "peak (unknown here)"
        report.add(
            f"**The step's speed switches** (`train.speed`; a fresh {s.model} per variant, whose warm-up "
            f"steps compile), median of {s.steps} after {s.warmup} warm-up: ms, x IID of the same variant, "
            "and the step's model FLOPs (appendix A.4) per second against the card's {unit}:",
            "",
            "| variant | method | images per step | ms | x IID | TFLOP/s | of peak | target |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            *speed_rows(s, device, variants),
        )
        report.add(
            f"**The small model**: {s.small_model} at its own input size, b = {s.small_batch}, IID steps at "
            "the default precision (bf16 autocast on CUDA), by compile mode (`reduce-overhead`: CUDA "
            "graphs):",
            "",
            "| compile | ms | steps/s | target |",
            "|---|---:|---:|---|",
            *small_rows(s, device, tuple(args.small_compile), args.compile_backend),
        )


if __name__ == "__main__":
    main()
