"""Step functions, composed from selection, models and a super-batch; ``methods.py`` says which each method
runs and with what.

Every step takes its method's description, the learner, a super-batch already on the device and the
method's settings, and returns the loss to back-propagate with what it selected and counted; the trainer
owns the optimiser, logging and I/O.

- ``learn_batch_step`` (iid): learn on the whole batch (its super-batch is the batch).
- ``select_and_learn_step`` (jest, independent, flexi-jest): score the B candidates without gradients (the
  learner, exact or approximate, when the scoring rule uses it), pick b with the method's selector, learn on
  them; a method that learns approximately learns a random ``approx_fraction`` of the pick with
  ``cfg.approx`` and the rest at full resolution, one loss over all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from jestclip.models.approx import Approximation, encode_image
from jestclip.models.factory import logit_params
from jestclip.selection import Embeddings, batch_score, independent_select, joint_select

if TYPE_CHECKING:
    from jestclip.train.config import MethodConfig
    from jestclip.train.methods import Method

__all__ = [
    "StepOutput",
    "SuperBatchTensors",
    "contrastive_loss",
    "learn_batch_step",
    "score_embeddings",
    "select_and_learn_step",
]


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


def _select(
    method: Method,
    learner: Embeddings | None,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None,
    world_size: int,
) -> Tensor:
    """``[b / W]`` indices into this rank's candidates, chosen by the method's selector."""
    common = dict(size=cfg.batch_size, scoring=cfg.scoring, loss=cfg.loss, gain=cfg.gain, generator=generator)
    if world_size > 1:
        from jestclip.train.distributed import distributed_independent_select, distributed_joint_select

        if method.selector == "joint":
            return distributed_joint_select(learner, batch.reference, n_chunks=cfg.n_chunks, **common)[0]
        if cfg.independent_context != "unconditional":
            raise ValueError("distributed independent selection needs independent_context='unconditional'")
        return distributed_independent_select(
            learner, batch.reference, method=cfg.independent_method, **common
        )
    if method.selector == "joint":
        return joint_select(learner, batch.reference, n_chunks=min(cfg.n_chunks, cfg.batch_size), **common)
    return independent_select(
        learner, batch.reference, context=cfg.independent_context, method=cfg.independent_method, **common
    )


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


def learn_batch_step(
    method: Method,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
) -> StepOutput:
    """Learn on the whole batch (this rank's b / W of it)."""
    _check_sizes(batch, cfg, world_size, exact=True)
    selected = torch.arange(len(batch), device=batch.images.device)
    loss = _learn(model, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, scored=0, learned=len(selected) * world_size)


def select_and_learn_step(
    method: Method,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
) -> StepOutput:
    """Score the super-batch (no grad), select b with ``method.selector``, learn on the selection."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learner = None
    if method.scores_with_learner(cfg.scoring):
        learner = score_embeddings(model, batch, method.scoring_approx(cfg))
    selected = _select(method, learner, batch, cfg, generator, world_size)
    approx_part = None
    if method.learns_approx:  # a random share: selection order is not random
        order = torch.randperm(len(selected), generator=generator, device=selected.device)
        approx_part = order[: round(method.learned_approx_fraction(cfg) * len(selected))]
    loss = _learn(model, batch, selected, cfg, world_size, approx_part)
    score = None
    if world_size == 1:  # the sub-batch score would need every rank's embeddings
        score = float(batch_score(learner, batch.reference, selected, scoring=cfg.scoring, loss=cfg.loss))
    scored = len(batch) * world_size if learner is not None else 0
    return StepOutput(loss, selected, scored, len(selected) * world_size, score)
