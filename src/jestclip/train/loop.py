"""The training run: data, reference cache, one ``run_step`` per super-batch, metrics, checkpoints, resume.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per logged step),
``tb/`` (TensorBoard events), ``checkpoint.pt`` (full state, written atomically every ``checkpoint_every``
steps, on SIGTERM and at ``stop_after``) and, when training finishes, ``model.pt`` (weights only). With
``eval_data``, evaluation lines (``eval/...`` metrics with the counters) are logged at step 0, every
``eval_every`` steps and at the end. Starting a run whose directory has a checkpoint resumes it exactly:
model, optimiser, schedule, RNG states, counters and data position (the stream is replayed to the step
reached; on CPU the result is bitwise that of an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from jestclip.data.loader import SuperBatchStream, expand_urls
from jestclip.data.refcache import ReferenceCache
from jestclip.eval import evaluate, find_suites, flat_metrics
from jestclip.models import create_model, forward_flops, image_transform, step_flops, tokenizer
from jestclip.train.config import TrainConfig, to_dict
from jestclip.train.distributed import average_gradients
from jestclip.train.optim import make_optimizer, make_scheduler
from jestclip.train.steps import SuperBatchTensors, run_step

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "Counters", "run_weights", "train"]

CHECKPOINT_FILE = "checkpoint.pt"  # full training state
MODEL_FILE = "model.pt"  # final weights only

# config keys that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE_CHANGES = {"stop_after", "num_workers", "device", "log_every", "checkpoint_every"}


@dataclass
class Counters:
    step: int = 0
    examples_learned: int = 0
    examples_scored: int = 0
    flops_train: float = 0.0
    flops_score: float = 0.0
    flops_reference: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def flops_total(self) -> float:
        return self.flops_train + self.flops_score + self.flops_reference


def _counter_fields(counters: Counters) -> dict[str, Any]:
    """The counters every metrics line carries: where the run is, in steps, examples and FLOPs."""
    return {
        "step": counters.step,
        "examples_learned": counters.examples_learned,
        "examples_scored": counters.examples_scored,
        "flops_train": counters.flops_train,
        "flops_score": counters.flops_score,
        "flops_reference": counters.flops_reference,
        "flops_total": counters.flops_total,
    }


def run_weights(run_dir: str | Path) -> Path:
    """The weights of a run: its final ``model.pt``, else its latest ``checkpoint.pt`` (both load with
    ``create_model(checkpoint=...)``); a ValueError when it has neither yet.
    """
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        if (run_dir / name).exists():
            return run_dir / name
    raise ValueError(f"run {run_dir} has no {MODEL_FILE} or {CHECKPOINT_FILE} yet")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_resumable(run: Path, cfg: TrainConfig) -> None:
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    current = to_dict(cfg)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError(f"{run} holds a run with a different config ({changed}); use another run_dir")


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or torchrun's environment, or (0, 1)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes; return the last metrics line.

    Under ``torchrun`` (or an initialised process group) every rank reads its own shards, holds B / W of each
    super-batch and learns on b / W of it; gradients are averaged; rank 0 writes metrics and checkpoints.
    """
    run = Path(cfg.run_dir)
    device = _device(cfg.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    if cfg.super_batch % world or cfg.method.batch_size % world:
        raise ValueError(
            f"batch_size {cfg.method.batch_size} and super-batch {cfg.super_batch} must be divisible by the "
            f"world size {world}"
        )
    checkpoint_path = run / CHECKPOINT_FILE
    resuming = checkpoint_path.exists()
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if resuming:
            _check_resumable(run, cfg)
        (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    if world > 1:
        dist.barrier()

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, loss=cfg.method.loss, checkpoint=cfg.init_checkpoint, device=device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.optim)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    counters = Counters()

    if resuming:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        torch.set_rng_state(state["torch_rng"].cpu())
        counters = Counters(**state["counters"])

    urls = expand_urls(cfg.data)
    needs_reference = cfg.method.method != "iid" and cfg.method.scoring != "hard_learner"
    reference = None
    if needs_reference:
        if cfg.reference_cache is None:
            raise ValueError(
                f"method {cfg.method.method!r} with scoring {cfg.method.scoring!r} needs reference_cache"
            )
        reference = ReferenceCache(urls, name=cfg.reference_cache)  # validates every sidecar before training

    model_cfg = open_clip.get_model_config(cfg.model)
    image_size, context = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]["context_length"]
    learner_flops = forward_flops(model, image_size=image_size, context_length=context)
    approx_flops = None
    if cfg.method.method == "flexi-jest":
        approx_flops = forward_flops(
            model, image_size=image_size, context_length=context, approx=cfg.method.approx
        )
    per_step = step_flops(
        cfg.method.method,
        batch=cfg.method.batch_size,
        super_batch=cfg.super_batch,
        learner=learner_flops,
        approx_learner=approx_flops,
    )

    transform = image_transform(cfg.model)
    stream = SuperBatchStream(
        urls,
        batch_size=cfg.super_batch // world,
        transform=transform,
        resampled=True,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
    )
    batches = iter(DataLoader(stream, batch_size=None, num_workers=cfg.num_workers))
    for _ in range(counters.step):  # data position: replay the stream to where the checkpoint was taken
        next(batches)
    tokenize = tokenizer(cfg.model)
    suites = find_suites(cfg.eval_data) if cfg.eval_data is not None else []  # errors before training

    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    metrics_file = open(run / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tb")) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    last: dict[str, Any] = {}
    bar = tqdm(
        total=cfg.steps, initial=counters.step, desc=run.name, unit="step", disable=not progress or rank > 0
    )
    started = time.perf_counter()

    def log(line: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        for key, value in line.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(key, value, counters.step)

    def run_eval() -> None:
        """Evaluate on rank 0 (the others wait) and log an eval line with the counters."""
        if rank == 0:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                results = evaluate(
                    model,
                    suites,
                    tokenize=tokenize,
                    transform=transform,
                    device=device,
                    limit=cfg.eval_limit,
                )  # in a forked RNG: evaluating must not change the training run
            log({**_counter_fields(counters), **flat_metrics(results)})
            bar.set_postfix(eval=f"{results['average']:.3f}")
        if world > 1:
            dist.barrier()

    def save_checkpoint() -> None:
        if rank > 0:
            dist.barrier()  # wait until rank 0 has written it
            return
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "counters": asdict(counters),
                "config": to_dict(cfg),
            },
            checkpoint_path,
        )
        if world > 1:
            dist.barrier()

    try:
        if suites and cfg.eval_every and counters.step == 0:
            run_eval()  # the untrained model: where every curve starts
        while counters.step < cfg.steps:
            batch = next(batches)
            super_batch = SuperBatchTensors(
                images=batch.images.to(device, non_blocking=True),
                tokens=tokenize(batch.texts).to(device),
                reference=reference.lookup(batch.keys, device=device) if reference is not None else None,
            )
            model.train()
            with autocast:
                out = run_step(model, super_batch, cfg.method, generator, world_size=world)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if world > 1:
                average_gradients(model.parameters())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()

            counters.step += 1
            counters.examples_learned += out.learned
            counters.examples_scored += out.scored
            counters.flops_train += per_step.train
            counters.flops_score += per_step.score
            counters.flops_reference += per_step.reference
            counters.skipped = dict(Counter(counters.skipped) + Counter(batch.skipped))  # this rank's
            bar.update(1)

            if counters.step % cfg.log_every == 0 or counters.step == cfg.steps:
                last = {
                    **_counter_fields(counters),
                    "loss": out.loss.item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "selected_score": out.selected_score,
                    "samples_skipped": sum(counters.skipped.values()),
                    "wall_s": time.perf_counter() - started,
                }
                if rank == 0:
                    log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}")
            if suites and (
                (cfg.eval_every and counters.step % cfg.eval_every == 0) or counters.step == cfg.steps
            ):
                run_eval()

            if world > 1:  # a SIGTERM seen by any rank stops all of them at the same step
                flag = torch.tensor([int(stop["requested"])], device=device)
                dist.all_reduce(flag)
                stop["requested"] = bool(flag.item())
            planned_stop = cfg.stop_after is not None and counters.step >= cfg.stop_after
            if counters.step % cfg.checkpoint_every == 0 or stop["requested"] or planned_stop:
                save_checkpoint()
            if stop["requested"] or planned_stop:
                break
        if counters.step >= cfg.steps:
            save_checkpoint()
            if rank == 0:
                _atomic_save(model.state_dict(), run / MODEL_FILE)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if metrics_file is not None:
            metrics_file.close()
            writer.close()
        bar.close()
    return last
