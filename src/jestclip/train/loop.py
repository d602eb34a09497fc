"""The training run: for each super-batch, one method step and one optimiser update; around it, logging,
periodic evaluation, checkpoints and exact resume.

A run writes its directory (``rundir.RunDir``): the resolved config, a metrics line every ``log_every``
steps (and, with ``eval_data``, an evaluation line at step 0, every ``eval_every`` steps and at the end),
TensorBoard events, a checkpoint every ``checkpoint_every`` steps, on SIGTERM and at ``stop_after``, and the
final weights. Starting a run whose directory has a checkpoint resumes it exactly: model, optimiser,
schedule, RNG states, counters and data position (the stream is replayed to the step reached; on CPU the
result is bitwise that of an uninterrupted run). Under torchrun every rank reads its own shards, holds
B / W of each super-batch and learns on b / W of it; only rank 0 writes (``RunOutputs``).
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import nullcontext
from typing import Any

import torch
from tqdm import tqdm

from jestclip.data.loader import expand_urls
from jestclip.eval import evaluate, find_suites, flat_metrics
from jestclip.models import image_transform, tokenizer
from jestclip.train.config import TrainConfig, to_dict
from jestclip.train.distributed import average_gradients
from jestclip.train.methods import run_step
from jestclip.train.rundir import RunDir
from jestclip.train.setup import (
    Counters,
    Placement,
    TrainState,
    build_state,
    measure_step_flops,
    open_reference,
    open_stream,
    place,
    resume_batches,
    to_device,
)
from jestclip.train.steps import StepOutput, SuperBatchTensors

__all__ = ["RunOutputs", "train"]

# config keys that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE_CHANGES = {"stop_after", "num_workers", "device", "log_every", "checkpoint_every"}


def _prepare_run_dir(run: RunDir, cfg: TrainConfig, where: Placement) -> bool:
    """Write the resolved config (refusing to resume a different run); whether there is a checkpoint."""
    resuming = run.checkpoint_file.exists()
    if where.is_main:
        if resuming:
            saved, current = run.read_config(), to_dict(cfg)
            changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
            if changed:
                raise ValueError(
                    f"{run.path} holds a run with a different config ({changed}); use another run_dir"
                )
        run.write_config(to_dict(cfg))
    where.barrier()
    return resuming


class RunOutputs:
    """Everything only rank 0 does: metrics lines, TensorBoard, the progress bar, checkpoints and weights.
    On other ranks every method is a no-op (saving still waits at the barrier with rank 0)."""

    def __init__(self, run: RunDir, cfg: TrainConfig, where: Placement, step: int, progress: bool) -> None:
        self.run, self.cfg, self.where = run, cfg, where
        self.metrics = run.open_metrics() if where.is_main else None
        self.writer = None
        if where.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard_dir))
        show = progress and where.is_main
        self.bar = tqdm(total=cfg.steps, initial=step, desc=run.name, unit="step", disable=not show)

    def log(self, line: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        for key, value in line.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, line["step"])

    def save(self, state: TrainState, *, final: bool = False) -> None:
        """Checkpoint (and with ``final`` the weights); every rank returns once rank 0 has written."""
        if self.where.is_main:
            self.run.save_checkpoint(state.state_dict(self.cfg))
            if final:
                self.run.save_weights(state.model.state_dict())
        self.where.barrier()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.writer.close()
        self.bar.close()


class Evaluator:
    """Periodic evaluation on ``cfg.eval_data``: rank 0 evaluates in a forked RNG, the others wait."""

    def __init__(self, cfg: TrainConfig, where: Placement, transform, tokenize) -> None:
        self.cfg, self.where, self.transform, self.tokenize = cfg, where, transform, tokenize
        self.suites = find_suites(cfg.eval_data) if cfg.eval_data is not None else []  # errors up front

    def due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(self.suites) and (bool(every and step % every == 0) or step == self.cfg.steps)

    def __call__(self, model: torch.nn.Module, counters: Counters, out: RunOutputs) -> None:
        if self.where.is_main:
            device = self.where.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                results = evaluate(
                    model,
                    self.suites,
                    tokenize=self.tokenize,
                    transform=self.transform,
                    device=device,
                    limit=self.cfg.eval_limit,
                )  # in a forked RNG: evaluating must not change the training run
            out.log({**counters.fields(), **flat_metrics(results)})
            out.bar.set_postfix(eval=f"{results['average']:.3f}")
        self.where.barrier()


def learn(
    state: TrainState, batch: SuperBatchTensors, cfg: TrainConfig, where: Placement
) -> tuple[StepOutput, float, float]:
    """One method step and optimiser update (bf16 autocast on CUDA); ``(output, grad norm, lr used)``."""
    state.model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if where.device.type == "cuda" else nullcontext()
    with autocast:
        out = run_step(state.model, batch, cfg.method, state.generator, world_size=where.world)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if where.world > 1:
        average_gradients(state.model.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    return out, float(grad_norm), lr


class _SigtermFlag:
    """Set on SIGTERM while the run is inside ``with``; the loop checkpoints and stops at the next step."""

    def __enter__(self) -> _SigtermFlag:
        self.raised = False
        self.previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_: Any) -> None:
        self.raised = True

    def __exit__(self, *_: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; return the last metrics line."""
    where, run = place(cfg), RunDir(cfg.run_dir)
    resuming = _prepare_run_dir(run, cfg, where)
    state = build_state(cfg, where.device)
    if resuming:
        state.load_state_dict(run.load_checkpoint(where.device))
    urls = expand_urls(cfg.data)
    reference = open_reference(cfg, urls)  # validates every sidecar before training
    cost = measure_step_flops(cfg, state.model)
    transform, tokenize = image_transform(cfg.model), tokenizer(cfg.model)
    batches = resume_batches(open_stream(cfg, urls, transform, where), cfg, state.counters.step)
    evaluator = Evaluator(cfg, where, transform, tokenize)
    out, last, started = RunOutputs(run, cfg, where, state.counters.step, progress), {}, time.perf_counter()
    try:
        with _SigtermFlag() as sigterm:
            if state.counters.step == 0 and evaluator.due(0):
                evaluator(state.model, state.counters, out)  # the untrained model: where every curve starts
            while state.counters.step < cfg.steps:
                batch = next(batches)
                result, grad_norm, lr = learn(
                    state, to_device(batch, tokenize, reference, where.device), cfg, where
                )
                state.counters.add_step(result, cost, batch.skipped)
                out.bar.update(1)
                step = state.counters.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = _train_line(state.counters, result, grad_norm, lr, started)
                    out.log(last)
                    out.bar.set_postfix(loss=f"{last['loss']:.3f}")
                if evaluator.due(step):
                    evaluator(state.model, state.counters, out)
                stop = where.any_rank(sigterm.raised) or (
                    cfg.stop_after is not None and step >= cfg.stop_after
                )
                if step % cfg.checkpoint_every == 0 or stop:
                    out.save(state)
                if stop:
                    break
        if state.counters.step >= cfg.steps:
            out.save(state, final=True)
    finally:
        out.close()
    return last


def _train_line(counters: Counters, out: StepOutput, grad_norm: float, lr: float, started: float) -> dict:
    """A metrics line for a logged training step."""
    return {
        **counters.fields(),
        "loss": out.loss.item(),
        "lr": lr,
        "grad_norm": grad_norm,
        "selected_score": out.selected_score,
        "samples_skipped": sum(counters.skipped.values()),
        "wall_s": time.perf_counter() - started,
    }
