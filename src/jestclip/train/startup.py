"""What a run is built from and how it starts: where it runs (``place``), its training state
(``build_state``), its data stream from where a checkpoint left it, its reference embeddings and keep list,
and what a step costs (``StepCosts``, ``scheduled_steps``); ``start`` assembles them for the step loop
(``loop.train``), checking the run directory first. The selection diagnostics (``report.diagnostics``)
rebuild a run through these same functions.

Starting a run whose directory has a checkpoint resumes it: the newest checkpoint that loads (newer ones that
do not are set aside as ``*.corrupt``), metrics lines past its step dropped. A resume refuses a directory
holding a run of another config (other than ``_RESUMABLE_CHANGES``), and a reference cache or keep list
changed since the run started (recorded in ``reference.json`` / ``keep_list.json``).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import open_clip
import torch
import torch.distributed as dist
from torch import nn

from jestclip.data.files import check_writable
from jestclip.data.keeplist import KeepList
from jestclip.data.loader import ResumableBatches, SuperBatch, SuperBatchStream, expand_urls
from jestclip.data.pool import MemoryPool, PoolBatches
from jestclip.data.ranks import Ranks
from jestclip.data.refcache import ReferenceCache
from jestclip.models import (
    ForwardFlops,
    StepFlops,
    create_model,
    forward_flops,
    image_size,
    image_transform,
    tokenizer,
)
from jestclip.train.composition import Composition, batch_quality
from jestclip.train.config import ConfigError, TrainConfig, to_dict, with_defaults
from jestclip.train.distributed import data_parallel
from jestclip.train.methods import step_method
from jestclip.train.optim import make_optimizer, make_scheduler
from jestclip.train.rundir import RunDir
from jestclip.train.schedule import steps_for_flops
from jestclip.train.settings import MethodConfig
from jestclip.train.speed import ScoringCopy, compile_problem, prepare_learner
from jestclip.train.steps import StepOutput, SuperBatchTensors

__all__ = [
    "Counters",
    "Placement",
    "Started",
    "StepCosts",
    "TrainState",
    "build_model",
    "build_state",
    "measure_step_flops",
    "open_keep_list",
    "open_reference",
    "open_stream",
    "place",
    "scheduled_steps",
    "start",
    "to_device",
]


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device, its rank and the world size (1 without torch.distributed)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory, logs and evaluates."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value)
        return bool(value.item())


def place(cfg: TrainConfig) -> Placement:
    """The device (``auto``: cuda when available; torchrun's LOCAL_RANK picks the GPU) and the process group
    (an initialised one, or torchrun's environment: nccl on CUDA, gloo on CPU)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return Placement(device)
    where = Placement(device, dist.get_rank(), dist.get_world_size())
    # a selection schedule rounds each step's B to a multiple of the world size (schedule.super_batch_at)
    uneven = cfg.method.schedule.always and cfg.super_batch % where.world
    if uneven or cfg.method.batch_size % where.world:
        raise ValueError(
            f"batch_size {cfg.method.batch_size} and super-batch {cfg.super_batch} must be divisible by the "
            f"world size {where.world}"
        )
    return where


@dataclass
class Counters:
    """Where a run is, in steps, examples and FLOPs (split per appendix A.4); this rank's skipped samples by
    reason; the steps whose update was skipped (non-finite loss or gradients: they learn nothing and count
    no examples or FLOPs)."""

    step: int = 0
    examples_learned: int = 0
    examples_scored: int = 0
    flops_train: float = 0.0
    flops_score: float = 0.0
    flops_reference: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_updates: int = 0

    @property
    def flops_total(self) -> float:
        return self.flops_train + self.flops_score + self.flops_reference

    def add_step(self, out: StepOutput, cost: StepFlops, skipped: dict[str, int]) -> None:
        self.step += 1
        self.examples_learned += out.learned
        self.examples_scored += out.scored
        self.flops_train += cost.train
        self.flops_score += cost.score
        self.flops_reference += cost.reference
        self.skipped = dict(Counter(self.skipped) + Counter(skipped))

    def skip_update(self, skipped: dict[str, int]) -> None:
        """A step whose update was skipped: its data was read (its samples skipped) but nothing learned."""
        self.step += 1
        self.skipped_updates += 1
        self.skipped = dict(Counter(self.skipped) + Counter(skipped))

    def fields(self) -> dict[str, Any]:
        """The counters every metrics line carries."""
        return {
            "step": self.step,
            "examples_learned": self.examples_learned,
            "examples_scored": self.examples_scored,
            "flops_train": self.flops_train,
            "flops_score": self.flops_score,
            "flops_reference": self.flops_reference,
            "flops_total": self.flops_total,
        }


def build_model(cfg: TrainConfig, device: torch.device, checkpoint: Any = None) -> nn.Module:
    """The run's learner (``cfg.model`` for ``cfg.method.loss``), from ``checkpoint`` or its init weights."""
    weights = checkpoint if checkpoint is not None else cfg.init_checkpoint
    return create_model(cfg.model, loss=cfg.method.loss, checkpoint=weights, device=device)


@dataclass
class TrainState:
    """Everything a checkpoint holds: learner, optimiser, schedule, selection generator, counters, the
    composition counts since the last metrics line; and, under torchrun, ``learn_module``: the DDP-wrapped
    ``LearningForward(model)`` the steps learn through (the model's own parameters; not checkpointed; None on
    one process, where the steps use the model itself); with ``speed.bf16_scoring``, the learner's bf16 copy
    that scores (``speed.ScoringCopy``, refreshed from the model each selecting step; not checkpointed)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    counters: Counters
    learn_module: nn.Module | None = None
    data: list[dict[str, Any] | None] | None = None  # every rank's data position (ResumableBatches.positions)
    composition: Composition = field(default_factory=Composition)  # since the last metrics line
    scoring_copy: ScoringCopy | None = None  # speed.bf16_scoring: derived from the model, not checkpointed

    def state_dict(self, cfg: TrainConfig) -> dict[str, Any]:
        """The checkpoint; ``data`` is the data position as last set (the loop sets it before each save)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "counters": asdict(self.counters),
            "config": to_dict(cfg),
            "data": self.data,
            "composition": self.composition.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint, the global torch RNG, the data position and the composition counts included
        (None in a checkpoint written before jestclip recorded them)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # RNG states are CPU byte tensors whatever the generator's device (a CUDA generator refuses one that
        # a checkpoint loaded with map_location="cuda" moved there)
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.counters = Counters(**state["counters"])
        self.data = state.get("data")
        self.composition.load_state_dict(state.get("composition"))


def build_state(cfg: TrainConfig, device: torch.device) -> TrainState:
    """A fresh training state, seeded by ``cfg.seed`` (the model's init draws from the global torch RNG); in a
    process group of more than one rank its ``learn_module`` is the model wrapped in DDP."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.optim)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if problem := compile_problem(cfg.speed, device):
        raise ConfigError("speed.compile", cfg.speed.compile, problem)
    scoring_copy = prepare_learner(model, cfg.speed, selects=cfg.method.description.selects)
    learn_module = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        learn_module = data_parallel(model, device)
    return TrainState(
        model, optimizer, scheduler, generator, Counters(), learn_module, scoring_copy=scoring_copy
    )


def open_reference(
    cfg: TrainConfig, urls: list[str], where: Placement | None = None
) -> ReferenceCache | None:
    """The cached reference embeddings of the training shards ``urls`` (a rank's own, for a stream) when the
    method needs them, else None. Checked up front: a ValueError names a missing or stale sidecar, a model
    other than ``cfg.reference_fingerprint``, or (with ``where`` of several ranks) ranks whose shards hold
    different models' embeddings."""
    if not cfg.method.description.needs_reference(cfg.method.scoring):
        return None
    assert cfg.reference_cache is not None  # TrainConfig refuses a method that needs it without it
    ranks = Ranks(where.rank, where.world) if where is not None else Ranks()
    cache = ranks.run(  # a sidecar missing on one rank's shards stops every rank, not that rank alone
        lambda: ReferenceCache(
            urls,
            name=cfg.reference_cache,
            fingerprint=cfg.reference_fingerprint,
            cache_dir=cfg.reference_cache_dir,
        )
    )
    if where is not None and where.world > 1:
        meta = cache.meta
        facts: list[Any] = [None] * where.world
        dist.all_gather_object(facts, (meta.fingerprint, meta.model, meta.dim, meta.scale, meta.bias))
        if any(f != facts[0] for f in facts):
            raise ValueError(
                f"the {cfg.reference_cache!r} sidecars of different ranks' shards hold different models' "
                f"embeddings ({sorted({f[1] for f in facts})}); run cache-reference again"
            )
    return cache


def _rank_shards(cfg: TrainConfig, urls: list[str], where: Placement) -> list[str]:
    """The shards this rank's stream reads (``SuperBatchStream.rank_shards``, without building it)."""
    probe = SuperBatchStream(
        urls, batch_size=1, resampled=True, seed=cfg.seed, rank=where.rank, world_size=where.world
    )
    return probe.rank_shards()


@dataclass(frozen=True)
class StepCosts:
    """FLOPs of one step of a run by the candidates B it draws (appendix A.4; reference embeddings cached):
    ``at(B)``. A step of a selecting method that draws B = b does not select and costs an IID step
    (``train.schedule``). Build with ``measure``."""

    method: MethodConfig
    learner: ForwardFlops
    approx: ForwardFlops | None = None

    @classmethod
    def measure(cls, cfg: TrainConfig, model: nn.Module | None = None) -> StepCosts:
        """The forward FLOPs of ``model`` (default: a fresh ``cfg.model``) at the run's input sizes."""
        model = model if model is not None else create_model(cfg.model, loss=cfg.method.loss)
        size = image_size(cfg.model)
        context = open_clip.get_model_config(cfg.model)["text_cfg"]["context_length"]
        learner = forward_flops(model, image_size=size, context_length=context)
        approx = None
        if cfg.method.description.uses_approximation:
            approx = forward_flops(model, image_size=size, context_length=context, approx=cfg.method.approx)
        return cls(cfg.method, learner, approx)

    def at(self, super_batch: int) -> StepFlops:
        """FLOPs of a step that draws ``super_batch`` candidates."""
        method = step_method(self.method, select=super_batch > self.method.batch_size)
        return method.step_flops(
            self.method, super_batch=super_batch, learner=self.learner, approx_learner=self.approx
        )

    def total(self, super_batch: int) -> float:
        return self.at(super_batch).total


def measure_step_flops(cfg: TrainConfig, model: nn.Module) -> StepFlops:
    """FLOPs of one step of the run at its filter ratio (reference embeddings cached), measured on
    ``model``'s forward (a step's own under a selection schedule: ``StepCosts.at``)."""
    return StepCosts.measure(cfg, model).at(cfg.super_batch)


def scheduled_steps(cfg: TrainConfig, budget: float, model: nn.Module | None = None) -> int:
    """The ``steps`` of ``cfg`` *scheduled* for ``budget`` total FLOPs (reference cached): the most steps
    whose per-step FLOPs, under its selection schedule laid over those steps, sum to at most ``budget``
    (``schedule.steps_for_flops``). E.g. IID's total for a JEST run at IID's cost."""
    costs = StepCosts.measure(cfg, model)
    if not cfg.method.description.selects:
        return int(budget // costs.total(cfg.method.batch_size))
    return steps_for_flops(
        budget,
        costs.total,
        cfg.method.schedule,
        batch_size=cfg.method.batch_size,
        filter_ratio=cfg.filter_ratio,
    )


def open_keep_list(cfg: TrainConfig, urls: list[str], own: list[str] | None = None) -> KeepList | None:
    """The keep list ``cfg.keep_list`` checked against the training shards ``urls`` (a ValueError, one line:
    not a keep list, written for other shards, a shard of ``own`` — default all — changed in size since), or
    None. No shard is read here: kept samples are checked where they are read (``KeepList``)."""
    if cfg.keep_list is None:
        return None
    keep = KeepList(cfg.keep_list)
    keep.check(urls, own)
    return keep


def open_stream(
    cfg: TrainConfig,
    urls: list[str],
    transform: Callable,
    where: Placement,
    *,
    batch_size: int | None = None,
    resampled: bool = True,
    progress: bool = False,
    keep: KeepList | None = None,
) -> SuperBatchStream | MemoryPool:
    """The run's stream of super-batches (this rank's B / W of each unless ``batch_size`` says otherwise);
    with ``cfg.draft_decode`` JPEGs are decoded at the smallest scale still covering the learner's input;
    with ``cfg.keep_list`` only the pairs it keeps are read (``keep``: the keep list opened already, else it
    is opened and checked here: ``open_keep_list``).
    With ``cfg.data_in_memory`` (and ``resampled``: a training run) the shards are decoded once into a
    ``MemoryPool`` (a ValueError when it would not fit in memory); ``progress``: its decoding bar and summary
    line on rank 0."""
    scheduled = batch_size is None and not cfg.method.schedule.always
    stream = SuperBatchStream(
        urls,
        batch_size=batch_size if batch_size is not None else cfg.max_super_batch(where.world) // where.world,
        batch_sizes=functools.partial(_local_super_batch, cfg, where.world) if scheduled else None,
        transform=transform,
        resampled=resampled,
        seed=cfg.seed,
        rank=where.rank,
        world_size=where.world,
        decode_size=image_size(cfg.model) if cfg.draft_decode else None,
        keep=keep if keep is not None else open_keep_list(cfg, urls),
    )
    if cfg.data_in_memory and resampled:
        return MemoryPool.from_stream(stream, progress=progress and where.is_main)
    return stream


def _local_super_batch(cfg: TrainConfig, world: int, step: int) -> int:
    """This rank's share of step ``step``'s super-batch (picklable for loader workers)."""
    return cfg.super_batch_at(step, world) // world


def resume_batches(
    stream: SuperBatchStream | MemoryPool,
    cfg: TrainConfig,
    step: int,
    data: list[dict[str, Any] | None] | None = None,
    *,
    pin_memory: bool = False,
) -> ResumableBatches | PoolBatches:
    """The stream through ``cfg.num_workers`` loader workers (a ``MemoryPool``: in this process) from where
    step ``step`` left it: at this rank's entry of the checkpoint's data position ``data`` (reading nothing
    consumed before), or, for a checkpoint without one, by replaying ``step`` super-batches (a pool computes
    where they end; a warning says so). A ValueError when the position was recorded with another world size
    or ``num_workers``, or by another kind of stream or pool. ``pin_memory``: the stream's batches come in
    page-locked memory (CUDA; ``speed.pin_memory``)."""
    if data is not None and len(data) != stream.world_size:
        raise ValueError(
            f"the checkpoint's data position is for {len(data)} ranks but this run has {stream.world_size}: "
            f"resume it on {len(data)} ranks"
        )
    position = data[stream.rank] if data is not None else None
    if position is not None or step == 0:
        if isinstance(stream, MemoryPool):
            return stream.batches(position)
        return ResumableBatches(stream, cfg.num_workers, position, pin_memory=pin_memory)
    how = "starting the pool after" if isinstance(stream, MemoryPool) else "replaying"
    warnings.warn(
        f"the checkpoint of step {step} records no data position (written by an older jestclip, or a stream "
        f"with a shuffle buffer): {how} {step} super-batches to reach it",
        RuntimeWarning,
        stacklevel=2,
    )
    if isinstance(stream, MemoryPool):
        return stream.batches(stream.position_after(step))
    batches = ResumableBatches(stream, cfg.num_workers, pin_memory=pin_memory)
    for _ in range(step):
        next(batches)
    return batches


def to_device(
    batch: SuperBatch,
    tokenize: Callable[[list[str]], torch.Tensor],
    reference: ReferenceCache | None,
    device: torch.device,
    *,
    pin_memory: bool = False,
) -> SuperBatchTensors:
    """A loaded super-batch on the device: images, tokenised captions, the reference's embeddings and the
    samples' ground-truth quality labels (None when none carries them). ``pin_memory`` (CUDA): images and
    tokens are copied from page-locked memory without blocking (images the loader pinned stay as they are;
    an in-memory pool's are pinned here)."""
    quality = batch_quality(batch)
    images, tokens = batch.images, tokenize(batch.texts)
    if pin_memory:
        images = images if images.is_pinned() else images.pin_memory()
        tokens = tokens.pin_memory()
    return SuperBatchTensors(
        images=images.to(device, non_blocking=True),
        tokens=tokens.to(device, non_blocking=pin_memory),
        reference=(
            reference.lookup(batch.keys, batch.urls, digests=batch.digests, device=device)
            if reference is not None
            else None
        ),
        quality=quality.to(device) if quality is not None else None,
    )


# config keys that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE_CHANGES = {
    "run_dir",
    "stop_after",
    "num_workers",
    "draft_decode",
    "device",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_bad_steps",
    "reference_fingerprint",
    "reference_cache_dir",
    "speed",  # how steps use the device, not what they compute (precision may round otherwise)
}


def _prepare_run_dir(run: RunDir, cfg: TrainConfig, where: Placement) -> bool:
    """Remove leftover ``*.tmp`` files and write the resolved config (refusing to resume a different run);
    whether there is a checkpoint to resume from."""
    resuming = run.latest_checkpoint() is not None
    if where.is_main:
        check_writable(run.path, "run directory", "set run_dir=DIR to write the run elsewhere")
        run.clean_tmp()
        if resuming:
            saved, current = with_defaults(run.read_config()), to_dict(cfg)
            changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
            if changed:
                raise ValueError(
                    f"{run.path} holds a run with a different config ({changed}); use another run_dir"
                )
        run.write_config(to_dict(cfg))
    where.barrier()
    return resuming


def _start_state(run: RunDir, cfg: TrainConfig, where: Placement) -> TrainState:
    """A fresh state, or the newest checkpoint that loads (newer ones that do not are set aside as
    ``*.corrupt``); the metrics lines past its step are dropped."""
    resuming = _prepare_run_dir(run, cfg, where)
    state = build_state(cfg, where.device)
    loaded = run.load_latest(where.device) if resuming else None
    if loaded is not None:
        state.load_state_dict(loaded[1])
    where.barrier()  # every rank has loaded before rank 0 renames or rewrites anything
    if where.is_main:
        if loaded is not None:
            run.set_aside_newer(loaded[0])
        run.truncate_metrics(state.counters.step)
        run.truncate_tensorboard(state.counters.step)  # every log a run keeps: each step once
    return state


def _model_name(record: dict[str, Any]) -> str:
    return f"{record['model']} ({record['fingerprint'][:12]})"


def _check_reference(run: RunDir, reference: ReferenceCache | None, where: Placement, resuming: bool) -> None:
    """Record the reference cache's model in the run directory on a run's first start; on resume, a cache
    that now holds another model's embeddings is a ValueError."""
    if reference is None:
        return
    current = {
        "name": reference.name,
        "model": reference.meta.model,
        "fingerprint": reference.meta.fingerprint,
    }
    recorded = run.read_reference() if resuming else None
    if recorded is not None and recorded["fingerprint"] != current["fingerprint"]:
        raise ValueError(
            f"reference cache {reference.name!r} now holds model {_model_name(current)}'s embeddings but "
            f"this run was trained with model {_model_name(recorded)}'s; re-cache with {recorded['model']} "
            "or start a new run_dir"
        )
    if where.is_main and recorded != current:
        run.write_reference(current)


def _check_keep_list(run: RunDir, cfg: TrainConfig, where: Placement, resuming: bool) -> None:
    """Record the keep list's identity (the SHA-256 of its ``keep.json``) in the run directory on a run's
    first start; on resume, a keep list written anew at the same path (other pairs kept) is a ValueError."""
    if cfg.keep_list is None:
        return
    keep = KeepList(cfg.keep_list)
    current = {"path": str(keep.path), "sha256": keep.sha256, "kept": keep.kept, "keep": keep.header["keep"]}
    recorded = run.read_keep_list() if resuming else None
    if recorded is not None and recorded["sha256"] != current["sha256"]:
        raise ValueError(
            f"keep list {keep.path} was written again since this run started (keep.json sha256 "
            f"{recorded['sha256'][:12]} then, {current['sha256'][:12]} now; {recorded['kept']} pairs kept "
            f"then, {current['kept']} now); resume with the keep list it started with or start a new run_dir"
        )
    if where.is_main and recorded != current:
        run.write_keep_list(current)


@dataclass
class Started:
    """A run ready for its first step (``start``). ``rng``: the global torch RNG state of the checkpoint (or
    of the seeded init), to set again before the first step (startup draws from it: loader seeds)."""

    where: Placement
    state: TrainState
    rng: torch.Tensor
    reference: ReferenceCache | None  # None when the method needs no reference embeddings
    costs: StepCosts
    transform: Callable  # the learner's image preprocessing
    tokenize: Callable[[list[str]], torch.Tensor]
    batches: ResumableBatches | PoolBatches  # from where ``state`` left the data


def start(run: RunDir, cfg: TrainConfig, *, progress: bool = False) -> Started:
    """Start or resume the run ``cfg`` describes in ``run``: place this process, prepare the run directory,
    load the newest checkpoint that loads (or build a fresh state), open the reference cache and keep list and
    check them against what the run recorded, measure the step costs, open the data at the state's position.

    Raises ValueError for a run directory holding a different run, a reference cache or keep list changed
    since the run started, a missing or stale reference sidecar, or a data position of another world size;
    ``data.files.NotWritableError`` for a run directory it cannot write. ``progress``: a memory pool's
    decoding bar on rank 0.
    """
    where = place(cfg)
    state = _start_state(run, cfg, where)
    rng = torch.get_rng_state()  # the checkpoint's (or seeded init's)
    urls = expand_urls(cfg.data)
    transform, tokenize = image_transform(cfg.model), tokenizer(cfg.model)
    own = urls if cfg.data_in_memory else _rank_shards(cfg, urls, where)  # what this rank reads
    reference = open_reference(cfg, own, where)  # its sidecars, checked before any data is decoded
    _check_reference(run, reference, where, resuming=state.counters.step > 0)
    _check_keep_list(run, cfg, where, resuming=state.counters.step > 0)
    keep = open_keep_list(cfg, urls, own)
    costs = StepCosts.measure(cfg, state.model)
    stream = open_stream(cfg, urls, transform, where, progress=progress, keep=keep)
    pin = cfg.speed.pins(where.device)
    batches = resume_batches(stream, cfg, state.counters.step, state.data, pin_memory=pin)
    return Started(where, state, rng, reference, costs, transform, tokenize, batches)
