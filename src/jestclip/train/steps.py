"""One step function per method, composed from selection, models and a super-batch.

Every step takes the learner, a super-batch already on the device and the method's settings, and returns the
loss to back-propagate with what it selected and counted; the trainer owns the optimiser, logging and I/O.

- ``iid``: learn on the whole batch (its super-batch is the batch).
- ``jest``: score all B candidates with the learner (no grad), select b jointly, learn on them.
- ``independent``: as jest, with the paper's independent-prioritisation baseline as the selector.
- ``flexi-jest``: score with the approximate learner, select jointly, learn on the selection split between
  full resolution and the approximation (``approx_fraction`` of it approximate), one loss over all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from jestclip.models.approx import Approximation, encode_image
from jestclip.models.factory import logit_params
from jestclip.selection import Embeddings, batch_score, independent_select, joint_select

__all__ = [
    "METHODS",
    "STEPS",
    "MethodConfig",
    "StepOutput",
    "SuperBatchTensors",
    "contrastive_loss",
    "flexi_jest_step",
    "iid_step",
    "independent_step",
    "jest_step",
    "run_step",
    "score_embeddings",
]

METHODS: tuple[str, ...] = ("iid", "jest", "independent", "flexi-jest")


@dataclass(frozen=True)
class MethodConfig:
    method: str = "jest"
    batch_size: int = 256  # b, the examples learned on per step
    loss: str = "sigmoid"
    scoring: str = "learnability"
    n_chunks: int = 16
    gain: float = 100.0
    approx: Approximation = "flexi"  # flexi-jest's approximate learner
    approx_fraction: float = 0.5  # flexi-jest: share of the selected batch trained approximately
    independent_context: str = "unconditional"  # independent: "unconditional" or "superbatch"
    independent_method: str = "sample"  # independent: "sample" or "topk"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.approx_fraction <= 1.0:
            raise ValueError(f"approx_fraction must be in [0, 1], got {self.approx_fraction}")


@dataclass
class SuperBatchTensors:
    """A super-batch on the device: images ``[B, 3, H, W]``, tokens ``[B, L]``, reference embeddings."""

    images: Tensor
    tokens: Tensor
    reference: Embeddings | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class StepOutput:
    loss: Tensor  # scalar, with grad
    selected: Tensor  # [b] indices into the super-batch, in selection order
    scored: int  # candidates the learner scored (0 when it did not score)
    learned: int  # examples learned on
    selected_score: float | None = None  # batch_score of the selection under the scoring embeddings


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, loss: str) -> Tensor:
    """Batch loss of L2-normalised ``[b, E]`` embeddings: SigLIP's sigmoid loss or CLIP's softmax loss."""
    if loss == "sigmoid":
        return SigLipLoss()(image, text, scale, bias)
    if loss == "softmax":
        return ClipLoss()(image, text, scale)
    raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")


def _embed(
    model: nn.Module, images: Tensor, tokens: Tensor, approx: Approximation | None
) -> tuple[Tensor, Tensor]:
    image = encode_image(model, images, approx, normalize=True)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


@torch.no_grad()
def score_embeddings(model: nn.Module, batch: SuperBatchTensors, approx: Approximation | None) -> Embeddings:
    """The model's ``[B, D]`` embeddings of the super-batch in eval mode, without gradients (for scoring)."""
    was_training = model.training
    model.eval()
    try:
        image, text = _embed(model, batch.images, batch.tokens, approx)
    finally:
        model.train(was_training)
    scale, bias = logit_params(model)
    return Embeddings(image.float(), text.float(), scale.detach(), bias.detach())


def _scoring_learner(
    model: nn.Module, batch: SuperBatchTensors, cfg: MethodConfig, approx
) -> Embeddings | None:
    """The learner's embeddings of the super-batch for scoring (None when the scoring ignores the learner)."""
    return score_embeddings(model, batch, approx) if cfg.scoring != "easy_reference" else None


def _scored(batch: SuperBatchTensors, learner: Embeddings | None, world_size: int) -> int:
    return len(batch) * world_size if learner is not None else 0


def _score_of(learner, batch, selected, cfg: MethodConfig, world_size: int) -> float | None:
    if world_size > 1:
        return None  # the sub-batch score would need every rank's embeddings
    return float(batch_score(learner, batch.reference, selected, scoring=cfg.scoring, loss=cfg.loss))


def _joint_selection(learner, batch, cfg: MethodConfig, generator, world_size: int) -> Tensor:
    common = dict(size=cfg.batch_size, scoring=cfg.scoring, loss=cfg.loss, gain=cfg.gain, generator=generator)
    if world_size > 1:
        from jestclip.train.distributed import distributed_joint_select

        return distributed_joint_select(learner, batch.reference, n_chunks=cfg.n_chunks, **common)[0]
    return joint_select(learner, batch.reference, n_chunks=min(cfg.n_chunks, cfg.batch_size), **common)


def _check_sizes(batch: SuperBatchTensors, cfg: MethodConfig, world_size: int, *, exact: bool) -> None:
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world_size}")
    local = cfg.batch_size // world_size
    if exact and len(batch) != local:
        raise ValueError(
            f"iid learns on the whole batch: got {len(batch)} examples, batch_size {cfg.batch_size}"
        )
    if len(batch) < local:
        raise ValueError(f"super-batch of {len(batch)} is smaller than batch_size {cfg.batch_size}")


def _learn(
    model: nn.Module,
    batch: SuperBatchTensors,
    selected: Tensor,
    cfg: MethodConfig,
    world_size: int,
    approx_part: Tensor | None = None,
) -> Tensor:
    """Loss over the selection (all ranks' when distributed); ``approx_part`` positions use ``cfg.approx``."""
    images, tokens = batch.images[selected], batch.tokens[selected]
    if approx_part is None:
        image, text = _embed(model, images, tokens, None)
    else:
        exact = torch.ones(len(selected), dtype=torch.bool, device=selected.device)
        exact[approx_part] = False
        parts = [
            _embed(model, images[mask], tokens[mask], approx)
            for mask, approx in ((exact, None), (~exact, cfg.approx))
            if bool(mask.any())
        ]
        image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if world_size > 1:
        from jestclip.train.distributed import all_gather_with_grad

        image, text = all_gather_with_grad(image), all_gather_with_grad(text)
    scale, bias = logit_params(model)
    return contrastive_loss(image, text, scale, bias, cfg.loss)


def iid_step(model, batch: SuperBatchTensors, cfg: MethodConfig, generator=None, *, world_size: int = 1):
    """Learn on the whole batch (this rank's b / W of it)."""
    _check_sizes(batch, cfg, world_size, exact=True)
    selected = torch.arange(len(batch), device=batch.images.device)
    loss = _learn(model, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, scored=0, learned=len(selected) * world_size)


def jest_step(model, batch: SuperBatchTensors, cfg: MethodConfig, generator=None, *, world_size: int = 1):
    """Score with the learner (no grad), select jointly, learn on the selection at full resolution."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learner = _scoring_learner(model, batch, cfg, None)
    selected = _joint_selection(learner, batch, cfg, generator, world_size)
    loss = _learn(model, batch, selected, cfg, world_size)
    score = _score_of(learner, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, _scored(batch, learner, world_size), len(selected) * world_size, score)


def independent_step(
    model, batch: SuperBatchTensors, cfg: MethodConfig, generator=None, *, world_size: int = 1
):
    """As jest_step, with the independent-prioritisation baseline as the selector."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learner = _scoring_learner(model, batch, cfg, None)
    common = dict(size=cfg.batch_size, scoring=cfg.scoring, loss=cfg.loss, gain=cfg.gain, generator=generator)
    if world_size > 1:
        from jestclip.train.distributed import distributed_independent_select

        if cfg.independent_context != "unconditional":
            raise ValueError("distributed independent selection needs independent_context='unconditional'")
        selected = distributed_independent_select(
            learner, batch.reference, method=cfg.independent_method, **common
        )
    else:
        selected = independent_select(
            learner, batch.reference, context=cfg.independent_context, method=cfg.independent_method, **common
        )
    loss = _learn(model, batch, selected, cfg, world_size)
    score = _score_of(learner, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, _scored(batch, learner, world_size), len(selected) * world_size, score)


def flexi_jest_step(
    model, batch: SuperBatchTensors, cfg: MethodConfig, generator=None, *, world_size: int = 1
):
    """Score with the approximate learner, select jointly, learn on the selection split between full and
    approximate resolution (a random ``approx_fraction`` of it approximate: selection order is not random)."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learner = _scoring_learner(model, batch, cfg, cfg.approx)
    selected = _joint_selection(learner, batch, cfg, generator, world_size)
    order = torch.randperm(len(selected), generator=generator, device=selected.device)
    approx_part = order[: round(cfg.approx_fraction * len(selected))]
    loss = _learn(model, batch, selected, cfg, world_size, approx_part)
    score = _score_of(learner, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, _scored(batch, learner, world_size), len(selected) * world_size, score)


STEPS = {"iid": iid_step, "jest": jest_step, "independent": independent_step, "flexi-jest": flexi_jest_step}


def run_step(
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
) -> StepOutput:
    """The step function of ``cfg.method`` (``STEPS``); see the module docstring.

    With ``world_size > 1`` (torch.distributed initialised), ``batch`` is this rank's shard of the super-batch
    and ``cfg.batch_size`` the global b; each rank learns on its b / W picks and the loss covers the whole
    selection (features all-gathered with gradients). Counts in the output are global.
    """
    return STEPS[cfg.method](model, batch, cfg, generator, world_size=world_size)
