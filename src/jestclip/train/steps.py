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

A step learns through one module, ``LearningForward(model)``: the features and logit parameters of the
selected examples, every learning forward of the step in one call (scoring runs outside it, without
gradients, on the model itself). Under torchrun it is wrapped once in ``DistributedDataParallel``
(``distributed.data_parallel``), whose hooks all-reduce gradient buckets while backward is still running; each
rank passes only its ``b / W`` selected examples to open_clip's distributed losses, so no rank builds the
``b × b`` logits (see ``contrastive_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
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
    "LearningForward",
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


def contrastive_loss(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, loss: str, *, rank: int = 0, world_size: int = 1
) -> Tensor:
    """Batch loss of L2-normalised ``[b, E]`` embeddings: SigLIP's sigmoid loss or CLIP's softmax loss.

    With ``world_size > 1`` the embeddings are rank ``rank``'s ``b / W`` of the batch and the result is this
    rank's share, computed as open_clip does: SigLIP's loss of its images against every rank's texts
    (exchanged with neighbours), CLIP's rows and columns of its examples (features all-gathered with
    gradients). Each share is normalised by the local batch, so the mean over ranks is the batch loss and
    DDP's gradient average is its gradient.
    """
    if loss == "sigmoid":
        return SigLipLoss(rank=rank, world_size=world_size)(image, text, scale, bias)
    if loss == "softmax":
        clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        return clip(image, text, scale)
    raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")


def _embed(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    approx: Approximation | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    image = encode_image(model, images, approx, normalize=True, generator=generator)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


@torch.no_grad()
def score_embeddings(
    model: nn.Module,
    batch: SuperBatchTensors,
    approx: Approximation | None,
    generator: torch.Generator | None = None,
) -> Embeddings:
    """The model's ``[B, D]`` embeddings of the super-batch in eval mode, without gradients (for scoring);
    ``generator`` draws the patches ``"patch_drop"`` keeps (the run's own: a resume stays bitwise)."""
    was_training = model.training
    model.eval()
    try:
        image, text = _embed(model, batch.images, batch.tokens, approx, generator)
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


class LearningForward(nn.Module):
    """Every learning forward of a step as one module (what DDP wraps): the normalised features of the
    selected examples, the ``approx_part`` positions encoded with ``approx`` and the rest exactly (in that
    order: exact first; ``generator`` draws ``"patch_drop"``'s patches), and the model's logit scale and
    bias."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        approx_part: Tensor | None = None,
        approx: Approximation | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if approx_part is None:
            image, text = _embed(self.model, images, tokens, None)
        else:
            exact = torch.ones(len(images), dtype=torch.bool, device=images.device)
            exact[approx_part] = False
            parts = [
                _embed(self.model, images[mask], tokens[mask], part_approx, generator)
                for mask, part_approx in ((exact, None), (~exact, approx))
                if bool(mask.any())
            ]
            image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        scale, bias = logit_params(self.model)
        return image, text, scale, bias


def _learning_module(model: nn.Module, learn_module: nn.Module | None, world_size: int) -> nn.Module:
    if learn_module is not None:
        return learn_module
    if world_size > 1:
        raise ValueError(
            "world_size > 1 needs learn_module=data_parallel(model, device) (jestclip.train.distributed): "
            "without it the ranks' gradients are not averaged"
        )
    return LearningForward(model)


def _learn(
    learn_module: nn.Module,
    batch: SuperBatchTensors,
    selected: Tensor,
    cfg: MethodConfig,
    world_size: int,
    approx_part: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Loss over the selection; ``approx_part`` positions use ``cfg.approx``. Distributed: this rank's share
    (its gradient), valued at the loss over every rank's selection."""
    images, tokens = batch.images[selected], batch.tokens[selected]
    image, text, scale, bias = learn_module(images, tokens, approx_part, cfg.approx, generator)
    if world_size == 1:
        return contrastive_loss(image, text, scale, bias, cfg.loss)
    from jestclip.train.distributed import valued_at_rank_mean

    share = contrastive_loss(image, text, scale, bias, cfg.loss, rank=dist.get_rank(), world_size=world_size)
    return valued_at_rank_mean(share)


def learn_batch_step(
    method: Method,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
    learn_module: nn.Module | None = None,
) -> StepOutput:
    """Learn on the whole batch (this rank's b / W of it) through ``learn_module`` (default: the model)."""
    _check_sizes(batch, cfg, world_size, exact=True)
    learn_module = _learning_module(model, learn_module, world_size)
    selected = torch.arange(len(batch), device=batch.images.device)
    loss = _learn(learn_module, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, scored=0, learned=len(selected) * world_size)


def select_and_learn_step(
    method: Method,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
    learn_module: nn.Module | None = None,
) -> StepOutput:
    """Score the super-batch with ``model`` (no grad), select b with ``method.selector``, learn on the
    selection through ``learn_module`` (default: the model)."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learn_module = _learning_module(model, learn_module, world_size)
    learner = None
    if method.scores_with_learner(cfg.scoring):
        learner = score_embeddings(model, batch, method.scoring_approx(cfg), generator)
    selected = _select(method, learner, batch, cfg, generator, world_size)
    approx_part = None
    if method.learns_approx:  # a random share: selection order is not random
        order = torch.randperm(len(selected), generator=generator, device=selected.device)
        approx_part = order[: round(method.learned_approx_fraction(cfg) * len(selected))]
    loss = _learn(learn_module, batch, selected, cfg, world_size, approx_part, generator)
    score = None
    if world_size == 1:  # the sub-batch score would need every rank's embeddings
        score = float(batch_score(learner, batch.reference, selected, scoring=cfg.scoring, loss=cfg.loss))
    scored = len(batch) * world_size if learner is not None else 0
    return StepOutput(loss, selected, scored, len(selected) * world_size, score)
