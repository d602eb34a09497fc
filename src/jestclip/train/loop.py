"""The training run's step loop: for each super-batch, one method step and one optimiser update; around it,
logging, periodic evaluation, checkpoints and how a run ends. What the loop starts from (the run directory
checked, the state built or resumed, reference cache, keep list, data stream) is ``startup.start``.

A run writes its directory (``rundir.RunDir``): the resolved config, a metrics line every ``log_every`` steps
(and, with ``eval_data``, an evaluation line at step 0, every ``eval_every`` steps and at the end),
TensorBoard events, a checkpoint every ``checkpoint_every`` steps, on SIGTERM and at ``stop_after`` (the
newest ``keep_checkpoints`` are kept), the reference cache and keep list it trains with (a resume refuses
either changed since), and the final weights. Starting a run whose directory has a checkpoint resumes it
exactly: model, optimiser, schedule, RNG states, counters and data position (every rank's and loader worker's
place in its shards: a resumed run reads only what it has not consumed; on CPU the result is bitwise that of
an uninterrupted run); metrics lines past the checkpoint are dropped, so each step is logged once. Under
torchrun every rank reads its own shards, holds B / W of each super-batch and learns on b / W of it; only rank
0 writes (``RunOutputs``). When samples carry ground-truth quality (``data.quality``), each training line also
gives the composition of the candidates and of what was learned over the steps since the previous line
(``train.composition``).

How a run ends: it returns the last metrics line when it reaches ``steps`` or ``stop_after``. At ``steps`` the
final checkpoint and ``model.pt`` are written first, then the final evaluation runs: a failure there raises
``FinalEvaluationFailed`` with the training saved, and rerunning the same command evaluates without
training again (a finished run whose final evaluation is logged does nothing). It raises ``Preempted`` on
SIGTERM (checkpointed; rerun the same command to resume), ``Interrupted`` when a data loader worker died
(the out-of-memory killer: no checkpoint can be written mid-step; it names the last one, and a rerun resumes
from it), ``OutOfMemory`` when this process runs out of GPU or host memory (naming the last checkpoint and
what to lower), ``TrainingDiverged`` after
``max_bad_steps`` steps in a row with a non-finite loss or gradient norm (their updates are skipped; the last
good checkpoint is untouched) and ``CheckpointWriteError`` when a checkpoint cannot be written (disk full;
the previous checkpoint is kept).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from tqdm import tqdm

from jestclip.data.loader import ResumableBatches, SuperBatch, dead_loader_worker
from jestclip.data.progress import progress as progress_bar
from jestclip.eval import check_labels, evaluate, find_suites, flat_metrics
from jestclip.models import StepFlops
from jestclip.models.factory import logit_params
from jestclip.signals import deliver_again, inside_import
from jestclip.train import speed
from jestclip.train.config import TrainConfig
from jestclip.train.methods import run_step
from jestclip.train.rundir import CheckpointWriteError, NonFiniteStateError, RunDir
from jestclip.train.startup import Counters, Placement, StepCosts, TrainState, start, to_device
from jestclip.train.steps import StepOutput, SuperBatchTensors, score_embeddings

__all__ = [
    "CheckpointWriteError",
    "FinalEvaluationFailed",
    "Interrupted",
    "OutOfMemory",
    "Preempted",
    "RunOutputs",
    "TrainingDiverged",
    "train",
]


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` steps in a row were non-finite, or a state to be written was; the message names the
    steps and the last good checkpoint."""


class Preempted(RuntimeError):
    """The run stopped on SIGTERM (after checkpointing); rerunning the same command resumes it."""


class Interrupted(RuntimeError):
    """The run was stopped from outside before it could checkpoint (a data loader worker killed, e.g. by the
    out-of-memory killer); rerunning the same command resumes from the last checkpoint, named."""


class OutOfMemory(RuntimeError):
    """The run ran out of GPU or host memory in a step; the message names the last checkpoint to resume from
    once the run asks for less."""


class FinalEvaluationFailed(RuntimeError):
    """The run trained to ``steps`` and wrote its final checkpoint and weights, then its final evaluation
    failed; rerunning the same command evaluates again without training."""


class RunOutputs:
    """Everything only rank 0 does: metrics lines, TensorBoard, the progress bar, checkpoints and weights.
    On other ranks every method is a no-op (saving still waits for rank 0, and fails with it)."""

    def __init__(self, run: RunDir, cfg: TrainConfig, where: Placement, step: int, progress: bool) -> None:
        self.run, self.cfg, self.where = run, cfg, where
        self.checkpoint = run.latest_checkpoint()  # the last good one: loaded or written by this run
        self.metrics = run.open_metrics() if where.is_main else None
        self.writer = None
        if where.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard_dir))
        show = progress and where.is_main
        self.bar = progress_bar(total=cfg.steps, initial=step, desc=run.name, unit="step", disable=not show)

    def log(self, line: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        for key, value in line.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, line["step"])

    def evaluated(self, step: int) -> bool:
        """Whether the metrics file holds an evaluation line of ``step`` (rank 0's answer, on every rank)."""
        logged = self.where.is_main and any(
            line["step"] == step and "eval/average" in line for line in self.run.read_metrics()
        )
        return self.where.any_rank(logged)

    def last_logged(self) -> dict[str, Any]:
        """The last training line of the metrics file (what a finished run's rerun returns; {} off rank 0)."""
        lines = self.run.read_metrics() if self.where.is_main else []
        return next((line for line in reversed(lines) if "eval/average" not in line), {})

    def say(self, message: str) -> None:
        """One line on stderr from rank 0 (above the progress bar)."""
        if self.where.is_main:
            tqdm.write(message, file=sys.stderr)

    @property
    def last_good(self) -> str:
        return self.run.describe(self.checkpoint) if self.checkpoint else "none (no checkpoint was written)"

    def save(self, state: TrainState, *, final: bool = False) -> None:
        """Checkpoint (and with ``final`` the weights); every rank returns once rank 0 has written, or raises
        when it could not (``TrainingDiverged`` for a non-finite state, ``CheckpointWriteError``)."""
        error: Exception | None = None
        if self.where.is_main:
            try:
                path = self.run.save_checkpoint(state.state_dict(self.cfg), keep=self.cfg.keep_checkpoints)
                self.checkpoint = path
                if final:
                    self.run.save_weights(state.model.state_dict())
            except NonFiniteStateError as exn:
                error = TrainingDiverged(
                    f"training diverged: {exn} (step {state.counters.step}); last good checkpoint: "
                    f"{self.last_good}"
                )
            except CheckpointWriteError as exn:
                error = exn
        if self.where.any_rank(error is not None) and error is None:
            error = CheckpointWriteError("checkpoint: rank 0 could not write the checkpoint")
        if error is not None:
            raise error

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.writer.close()
        self.bar.close()


class Evaluator:
    """Periodic evaluation on ``cfg.eval_data``: rank 0 evaluates in a forked RNG, the others wait."""

    def __init__(self, cfg: TrainConfig, where: Placement, transform, tokenize) -> None:
        self.cfg, self.where, self.transform, self.tokenize = cfg, where, transform, tokenize
        # every suite checked before the first step (manifest, class names, templates, label ids): an eval
        # that cannot succeed must not cost the training run that comes before it
        self.suites = find_suites(cfg.eval_data) if cfg.eval_data is not None else []
        for suite in self.suites:
            check_labels(suite, limit=cfg.eval_limit)

    def due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(self.suites) and (bool(every and step % every == 0) or step == self.cfg.steps)

    def __call__(self, model: torch.nn.Module, counters: Counters, out: RunOutputs) -> None:
        """Evaluate and log; an error on rank 0 is raised on every rank (the others do not wait forever)."""
        error: Exception | None = None
        if self.where.is_main:
            device = self.where.device
            try:
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
                out.bar.set_postfix(eval=f"{results['average']:.3f}", refresh=False)
            except Exception as exn:
                error = exn
        if self.where.any_rank(error is not None):
            raise error or RuntimeError("the evaluation failed on rank 0")


@dataclass
class Learned:
    """What one step did: the method's output (None when it did not run), the gradient norm, the learning
    rate used, and why its update was skipped (None when it was made)."""

    output: StepOutput | None
    grad_norm: float
    lr: float
    bad: str | None = None


def _bad_learner(model: torch.nn.Module) -> str | None:
    """Why the learner cannot take a meaningful step (non-finite weights, which no update brings back; a
    logit scale that is non-finite or underflowed to 0; a non-finite logit bias), else None."""
    params = [p.detach() for p in model.parameters()]
    if not math.isfinite(float(torch.nn.utils.get_total_norm(params))):  # one pass, one sync
        if not all(bool(torch.isfinite(p).all()) for p in params):  # not merely a norm that overflowed
            return "non-finite weights"
    scale, bias = (float(t.detach()) for t in logit_params(model))
    if not math.isfinite(scale) or scale <= 0.0:
        return f"logit scale {scale}"
    return None if math.isfinite(bias) else f"logit bias {bias}"


def learn(
    state: TrainState, batch: SuperBatchTensors, cfg: TrainConfig, where: Placement, *, select: bool = True
) -> Learned:
    """One method step and optimiser update (autocast per ``cfg.speed``: bf16 on CUDA by default; the bf16
    scoring copy refreshed first when it is on); ``select=False``: a step the method's
    selection schedule does not select on (an IID step). A step whose learner is broken
    (``_bad_learner``: it is not run), whose learner embeddings are non-finite, or whose loss or gradient
    norm is non-finite, changes no parameter (the schedule still advances); every rank decides alike."""
    state.model.train()
    learned = Learned(None, math.nan, state.optimizer.param_groups[0]["lr"], _bad_learner(state.model))
    if where.any_rank(learned.bad is not None):
        learned.bad = learned.bad or "broken learner on another rank"
    else:
        _step(state, batch, cfg, where, learned, select)
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return learned


def _step(
    state: TrainState,
    batch: SuperBatchTensors,
    cfg: TrainConfig,
    where: Placement,
    learned: Learned,
    select: bool = True,
) -> None:
    """The method step, backward and, when every number is finite, the optimiser update (into ``learned``)."""
    autocast = speed.autocast(cfg.speed, where.device)
    scorer = state.scoring_copy.scorer(state.model) if select and state.scoring_copy is not None else None
    try:
        with autocast:
            learned.output = run_step(
                state.model,
                batch,
                cfg.method,
                state.generator,
                select=select,
                world_size=where.world,
                learn_module=state.learn_module,
                scorer=scorer,
            )
    except ValueError:  # selection refuses candidates without finite scores: were they all non-finite?
        with autocast:
            if where.world > 1 or not select or not _non_finite_scores(state.model, batch, cfg):
                raise
        learned.bad = "non-finite learner embeddings"
        return
    state.optimizer.zero_grad(set_to_none=True)
    learned.output.loss.backward()  # under torchrun DDP averages the gradients over the ranks meanwhile
    learned.grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip))
    if not math.isfinite(float(learned.output.loss.detach())):
        learned.bad = "non-finite loss"
    elif not math.isfinite(learned.grad_norm):
        learned.bad = "non-finite gradient norm"
    if where.any_rank(learned.bad is not None):
        learned.bad = learned.bad or "non-finite step on another rank"
    else:
        state.optimizer.step()


def _non_finite_scores(model: torch.nn.Module, batch: SuperBatchTensors, cfg: TrainConfig) -> bool:
    """Whether the learner scores the super-batch with non-finite embeddings (weights finite but so large
    that its forward overflows)."""
    method = cfg.method.description
    if not method.scores_with_learner(cfg.method.scoring):
        return False
    generator = torch.Generator(batch.images.device).manual_seed(0)  # a diagnosis: the run's draws untouched
    scores = score_embeddings(model, batch, method.scoring_approx(cfg.method), generator)
    return not bool(torch.isfinite(scores.image).all() and torch.isfinite(scores.text).all())


class DivergenceGuard:
    """Counts the steps in a row whose update was skipped; ``cfg.max_bad_steps`` of them (at least 1) end the
    run with ``TrainingDiverged``."""

    def __init__(self, max_bad_steps: int) -> None:
        self.limit = max(1, max_bad_steps)
        self.streak, self.first, self.reasons = 0, 0, {}

    def update(self, step: int, bad: str | None, out: RunOutputs) -> None:
        if bad is None:
            self.streak, self.reasons = 0, {}
            return
        self.first = step if self.streak == 0 else self.first
        self.streak += 1
        self.reasons[bad] = None
        out.say(f"step {step}: {bad}; update skipped ({self.streak} in a row, max_bad_steps {self.limit})")
        if self.streak >= self.limit:
            steps = f"step {step}" if self.first == step else f"steps {self.first}-{step}"
            raise TrainingDiverged(
                f"training diverged: {', '.join(self.reasons)} at {steps} ({self.streak} in a row, "
                f"max_bad_steps={self.limit}); last good checkpoint: {out.last_good}"
            )


class _Sigterm:
    """SIGTERM while the run is inside ``with``. While it starts up (nothing learned since the last
    checkpoint, so nothing to save) a SIGTERM raises ``Preempted`` at once; after ``defer()`` (the step
    loop) it only sets ``raised``, and the loop checkpoints and stops after the current step. Loader worker
    processes (which inherit the handler) ignore it: the main process stops them."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.raised, self.deferred, self.pid = run, False, False, os.getpid()
        self.during = "starting"  # what a SIGTERM that stops the run at once interrupts

    def __enter__(self) -> _Sigterm:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            return
        if not self.deferred and inside_import(frame):  # not into a module's initialisation: once it is done
            deliver_again(signum, self.pid)
            return
        self.raised = True
        if not self.deferred:
            self._stop()

    def _stop(self) -> None:
        checkpoint = self.run.latest_checkpoint()
        step = (self.run.checkpoint_step(checkpoint) or 0) if checkpoint else 0
        raise Preempted(preempted_message(step, checkpoint, during=self.during))

    def defer(self) -> None:
        """From here on a SIGTERM only sets ``raised`` (one that came before stops the run now)."""
        self.deferred = True
        if self.raised:
            self._stop()

    def stop_at_once(self, during: str) -> None:
        """From here on (the final evaluation: the training is saved) a SIGTERM stops the run at once."""
        self.deferred, self.during = False, during
        if self.raised:
            self._stop()

    def __exit__(self, *_: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def preempted_message(step: int, checkpoint: Path | None, *, during: str | None = None) -> str:
    """``preempted at step N; checkpoint RUN/checkpoint-00000N.pt; rerun the same command to resume`` (with
    ``during``: ``preempted at step N while DURING; ...``)."""
    when = f"at step {step}" + (f" while {during}" if during else "")
    saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
    return f"preempted {when}; {saved}; rerun the same command to resume"


def interrupted_message(why: str, step: int, out: RunOutputs) -> str:
    """``interrupted after step N: WHY; last checkpoint RUN/checkpoint-00000K.pt (step K); rerun the same
    command to resume``."""
    checkpoint = f"last checkpoint {out.last_good}"
    return f"interrupted after step {step}: {why}; {checkpoint}; rerun the same command to resume"


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; return the last metrics line. Raises ``Preempted``,
    ``Interrupted``, ``OutOfMemory``, ``TrainingDiverged``, ``CheckpointWriteError`` or
    ``FinalEvaluationFailed`` (see the module docstring), and what ``startup.start`` raises; a
    KeyboardInterrupt names the last checkpoint."""
    run = RunDir(cfg.run_dir)
    with _Sigterm(run) as sigterm:  # first of all: a SIGTERM while starting stops the run at once
        started = start(run, cfg, progress=progress)
        where, state, tokenize, reference = started.where, started.state, started.tokenize, started.reference
        evaluator = Evaluator(cfg, where, started.transform, tokenize)
        out = RunOutputs(run, cfg, where, state.counters.step, progress)
        try:
            if state.counters.step == 0 and evaluator.due(0):
                evaluator(state.model, state.counters, out)  # the untrained model: where every curve starts
            sigterm.defer()
            torch.set_rng_state(started.rng)  # startup drew from it (loader seeds): steps start where it was
            steps = _Steps(
                cfg, where, state, out, evaluator, sigterm, started.costs, DivergenceGuard(cfg.max_bad_steps)
            )
            pin = cfg.speed.pins(where.device)
            on_device = lambda b: to_device(b, tokenize, reference, where.device, pin_memory=pin)  # noqa: E731
            return steps.run(started.batches, on_device)
        except (torch.OutOfMemoryError, MemoryError) as exn:  # GPU or host memory, in this process
            what = f"{type(exn).__name__}: {_one_line(exn).split('. ')[0][:200]}"
            lower = "lower method.batch_size or filter_ratio (or num_workers), then rerun to resume"
            step = state.counters.step
            raise OutOfMemory(
                f"out of memory after step {step} ({what}); last checkpoint {out.last_good}; {lower}"
            ) from exn
        except RuntimeError as exn:
            why = dead_loader_worker(exn)  # raised by torch at any line once a worker died: state unsaved
            if why is None:
                raise
            raise Interrupted(interrupted_message(why, state.counters.step, out)) from exn
        except KeyboardInterrupt as exn:
            raise KeyboardInterrupt(interrupted_message("SIGINT", state.counters.step, out)) from exn
        finally:
            out.close()


@dataclass
class _Steps:
    """The step loop of ``train``: learn, count, log, evaluate, checkpoint, stop."""

    cfg: TrainConfig
    where: Placement
    state: TrainState
    out: RunOutputs
    evaluator: Evaluator
    sigterm: _Sigterm
    costs: StepCosts
    guard: DivergenceGuard

    def run(
        self, batches: ResumableBatches, on_device: Callable[[SuperBatch], SuperBatchTensors]
    ) -> dict[str, Any]:
        """Steps until ``cfg.steps`` (then ``finish``) or ``stop_after``; the last metrics line."""
        cfg, state, out, last, started = self.cfg, self.state, self.out, {}, time.perf_counter()
        trained = False
        while state.counters.step < cfg.steps:
            trained = True
            size = cfg.super_batch_at(state.counters.step, self.where.world)  # B of this step (its schedule)
            batch = next(batches)
            if len(batch) != size // self.where.world:
                raise RuntimeError(
                    f"step {state.counters.step + 1}: the data served {len(batch)} candidates, "
                    f"not this rank's {size // self.where.world}"
                )
            tensors = on_device(batch)
            learned = learn(state, tensors, cfg, self.where, select=size > cfg.method.batch_size)
            self._count(learned, tensors, batch.skipped, self.costs.at(size))
            out.bar.update(1)
            step = state.counters.step
            if step % cfg.log_every == 0 or step == cfg.steps or learned.bad:
                last = {**_train_line(state.counters, learned, started), **state.composition.line()}
                out.log(last)
                out.bar.set_postfix(
                    loss="-" if last["loss"] is None else f"{last['loss']:.3f}", refresh=False
                )
            self.guard.update(step, learned.bad, out)
            if step == cfg.steps:
                break  # the final checkpoint and weights come before the final evaluation (finish)
            if self.evaluator.due(step):
                self.evaluator(state.model, state.counters, out)
            preempted = self.where.any_rank(self.sigterm.raised)
            stop = preempted or (cfg.stop_after is not None and step >= cfg.stop_after)
            if (step % cfg.checkpoint_every == 0 or stop) and self.guard.streak == 0:
                state.data = batches.positions()  # every rank's, for the checkpoint
                out.save(state)  # never in a run of bad steps: the last good checkpoint stays
            if preempted:
                raise Preempted(preempted_message(step, out.checkpoint))
            if stop:
                return last
        return self.finish(batches, trained, last)

    def finish(self, batches: ResumableBatches, trained: bool, last: dict[str, Any]) -> dict[str, Any]:
        """At ``cfg.steps``: the final checkpoint and ``model.pt`` (unless a finished run is rerun), then the
        final evaluation unless it is logged already; a failure there is ``FinalEvaluationFailed``."""
        state, out, step = self.state, self.out, self.state.counters.step
        if self.where.any_rank(trained or (self.where.is_main and not out.run.finished)):
            state.data = batches.positions()
            out.save(state, final=True)
        if self.where.any_rank(self.sigterm.raised):
            raise Preempted(preempted_message(step, out.checkpoint))
        if self.evaluator.due(step) and not out.evaluated(step):
            self.sigterm.stop_at_once("evaluating")  # nothing left to save
            try:
                self.evaluator(state.model, state.counters, out)
            except Preempted:
                raise
            except Exception as exn:
                raise FinalEvaluationFailed(
                    f"final evaluation failed: {type(exn).__name__}: {_one_line(exn)}; the training is "
                    f"complete and saved ({out.run.model_file}; {out.last_good}); rerun the same command to "
                    "evaluate again without training"
                ) from exn
        return last or out.last_logged()

    def _count(
        self, learned: Learned, batch: SuperBatchTensors, skipped: dict[str, int], cost: StepFlops
    ) -> None:
        if learned.bad is None:
            self.state.counters.add_step(learned.output, cost, skipped)
            self.state.composition.add(batch.quality, learned.output.selected, self.where.world)
        else:
            self.state.counters.skip_update(skipped)


def _one_line(exn: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exn).splitlines() if line.strip()) or "no message"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _train_line(counters: Counters, learned: Learned, started: float) -> dict:
    """A metrics line for a logged training step (non-finite loss / gradient norm: null)."""
    out = learned.output
    return {
        **counters.fields(),
        "loss": _finite(out.loss.item()) if out is not None else None,
        "lr": learned.lr,
        "grad_norm": _finite(learned.grad_norm),
        "selected_score": out.selected_score if out is not None and learned.bad is None else None,
        "samples_skipped": sum(counters.skipped.values()),
        **{f"skipped/{reason}": n for reason, n in sorted(counters.skipped.items())},
        "skipped_updates": counters.skipped_updates,
        "wall_s": time.perf_counter() - started,
    }
