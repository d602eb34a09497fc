"""Step functions, composed from selection, models and a super-batch; ``methods.py`` says which each method
runs and with what.

Every step takes its method's description, the learner, a super-batch already on the device and the
method's settings, and returns the loss to back-propagate with what it selected and counted; the trainer
owns the optimiser, logging and I/O.

- ``learn_batch_step`` (iid, drrho): learn on the whole batch (its super-batch is the batch).
- ``select_and_learn_step`` (jest, independent, flexi-jest): score the B candidates without gradients (the
  learner, exact or approximate, when the scoring rule uses it), pick b with the method's selector
  (``selection.selectors.SELECTORS``: its local form, or its distributed form under torchrun), learn on
  them; a method that learns approximately learns a random ``approx_fraction`` of the pick with
  ``cfg.approx`` and the rest at full resolution, one loss over all of it.

A step learns through one module, ``forward.LearningForward(model)``: the features and logit parameters of
the selected examples, every learning forward of the step in one call (scoring runs outside it, without
gradients, on the model itself). Under torchrun it is wrapped once in ``DistributedDataParallel``
(``distributed.data_parallel``), whose hooks all-reduce gradient buckets while backward is still running; each
rank passes only its ``b / W`` selected examples to its method's learning loss: ``contrastive_learning_loss``
(open_clip's distributed losses, so no rank builds the ``b × b`` logits; see ``contrastive_loss``) or
``steered_learning_loss`` (the DRRho-style loss of ``selection.steered_loss``).

Steps read their method's description through ``StepMethod`` and its settings through ``StepSettings`` (what
a step reads of ``settings.MethodConfig``; a selector reads its own fields, ``Selector.settings``): they
import neither ``methods`` (which names them) nor the settings (which name the methods).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from jestclip.models.approx import Approximation
from jestclip.models.factory import logit_params
from jestclip.selection import Embeddings, batch_score, steered_loss
from jestclip.selection.selectors import get_selector
from jestclip.train.distributed import gather_rows, valued_at_rank_mean
from jestclip.train.forward import LearningForward, embed

__all__ = [
    "LearningForward",
    "StepMethod",
    "StepOutput",
    "StepSettings",
    "SuperBatchTensors",
    "contrastive_learning_loss",
    "contrastive_loss",
    "learn_batch_step",
    "score_embeddings",
    "select_and_learn_step",
    "steered_learning_loss",
]


@dataclass
class SuperBatchTensors:
    """A super-batch on the device: images ``[B, 3, H, W]``, tokens ``[B, L]``, reference embeddings, and
    ground-truth quality labels ``[B, 1 + K]`` int8 when samples carry them (``composition.batch_quality``).
    """

    images: Tensor
    tokens: Tensor
    reference: Embeddings | None = None
    quality: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class StepOutput:
    loss: Tensor  # scalar, with grad
    selected: Tensor  # [b] indices into the super-batch, in selection order
    scored: int  # candidates the learner scored (0 when it did not score)
    learned: int  # examples learned on
    selected_score: float | None = None  # batch_score of the selection under the scoring embeddings


class StepSettings(Protocol):
    """What a step reads of its method's settings (``settings.MethodConfig``), besides what its selector
    reads (``Selector.settings``)."""

    method: str
    batch_size: int
    loss: str
    scoring: str
    gain: float
    approx: Approximation
    approx_fraction: float


class StepMethod(Protocol):
    """What a step reads from its method's description (``methods.Method``, which names the step)."""

    selector: str | None
    learns_approx: bool
    reference_in_loss: bool
    learning_loss: Callable[..., Tensor]

    def scores_with_learner(self, scoring: str) -> bool: ...

    def scoring_approx(self, cfg: StepSettings) -> Approximation | None: ...

    def learned_approx_fraction(self, cfg: StepSettings) -> float: ...


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


def contrastive_learning_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    reference: Embeddings | None,
    loss: str,
    *,
    world_size: int = 1,
) -> Tensor:
    """A learning loss (``Method.learning_loss``): the learner's own ``contrastive_loss``; under torchrun
    this rank's share. ``reference`` is not used."""
    rank = dist.get_rank() if world_size > 1 else 0
    return contrastive_loss(image, text, scale, bias, loss, rank=rank, world_size=world_size)


def steered_learning_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    reference: Embeddings | None,
    loss: str,
    *,
    world_size: int = 1,
) -> Tensor:
    """A learning loss (``Method.learning_loss``): the DRRho-style ``selection.steered_loss`` of the
    learned examples, ``reference`` their reference embeddings (required).

    Under torchrun, this rank's share: its rows against every rank's, the learner's rows all-gathered with
    gradients (as open_clip's ``ClipLoss(gather_with_grad=True)``) and the reference's without
    (``distributed.gather_rows``); the mean of the shares is the batch loss and DDP's gradient average its
    gradient. Each rank holds the ``[b, D]`` gathered features and builds ``[b / W, b]`` logits.
    """
    if reference is None:
        raise ValueError("the steered loss needs the reference's embeddings of the learned examples")
    if world_size == 1:
        return steered_loss(image, text, scale, bias, reference, loss)
    reference_rows = Embeddings(
        gather_rows(reference.image), gather_rows(reference.text), reference.scale, reference.bias
    )
    whole = (gather_rows(image, with_grad=True), gather_rows(text, with_grad=True), reference_rows)
    offset = dist.get_rank() * image.shape[0]
    return steered_loss(image, text, scale, bias, reference, loss, batch=whole, offset=offset)


@torch.no_grad()
def score_embeddings(
    model: nn.Module,
    batch: SuperBatchTensors,
    approx: Approximation | None,
    generator: torch.Generator | None = None,
    scorer: nn.Module | None = None,
) -> Embeddings:
    """The model's ``[B, D]`` float32 embeddings of the super-batch in eval mode, without gradients (for
    scoring); ``generator`` draws the patches ``"patch_drop"`` keeps (the run's own: a resume stays bitwise).
    ``scorer``: a bf16 copy of ``model`` (``speed.ScoringCopy``) runs the forward instead, images in bf16 and
    autocast off; the logit scale and bias are ``model``'s either way."""
    if scorer is not None:
        images = batch.images.to(next(scorer.parameters()).dtype)
        with torch.autocast(images.device.type, enabled=False):
            image, text = embed(scorer, images, batch.tokens, approx, generator)
    else:
        was_training = model.training
        model.eval()
        try:
            image, text = embed(model, batch.images, batch.tokens, approx, generator)
        finally:
            model.train(was_training)
    scale, bias = logit_params(model)
    return Embeddings(image.float(), text.float(), scale.detach(), bias.detach())


def _check_sizes(batch: SuperBatchTensors, cfg: StepSettings, world_size: int, *, exact: bool) -> None:
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world_size}")
    local = cfg.batch_size // world_size
    if exact and len(batch) != local:
        raise ValueError(
            f"{cfg.method} learns on the whole batch: got {len(batch)} examples, batch_size {cfg.batch_size}"
        )
    if len(batch) < local:
        raise ValueError(f"super-batch of {len(batch)} is smaller than batch_size {cfg.batch_size}")


def _select(
    method: StepMethod,
    learner: Embeddings | None,
    batch: SuperBatchTensors,
    cfg: StepSettings,
    generator: torch.Generator | None,
    world_size: int,
) -> Tensor:
    """``[b / W]`` indices into this rank's candidates, chosen by the method's selector."""
    return get_selector(method.selector).select(
        learner,
        batch.reference,
        cfg,
        size=cfg.batch_size,
        scoring=cfg.scoring,
        loss=cfg.loss,
        gain=cfg.gain,
        generator=generator,
        world_size=world_size,
    )


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
    method: StepMethod,
    learn_module: nn.Module,
    batch: SuperBatchTensors,
    selected: Tensor,
    cfg: StepSettings,
    world_size: int,
    approx_part: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The method's learning loss over the selection; ``approx_part`` positions use ``cfg.approx``.
    Distributed: this rank's share (its gradient), valued at the loss over every rank's selection."""
    images, tokens = batch.images[selected], batch.tokens[selected]
    image, text, scale, bias = learn_module(images, tokens, approx_part, cfg.approx, generator)
    reference = None
    if method.reference_in_loss:
        if batch.reference is None:
            raise ValueError("this method learns with the reference's embeddings: the batch has none")
        reference = batch.reference.take(selected)
    share = method.learning_loss(image, text, scale, bias, reference, cfg.loss, world_size=world_size)
    return share if world_size == 1 else valued_at_rank_mean(share)


def learn_batch_step(
    method: StepMethod,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: StepSettings,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
    learn_module: nn.Module | None = None,
    scorer: nn.Module | None = None,
) -> StepOutput:
    """Learn on the whole batch (this rank's b / W of it) through ``learn_module`` (default: the model);
    ``scorer`` is not used (nothing is scored)."""
    _check_sizes(batch, cfg, world_size, exact=True)
    learn_module = _learning_module(model, learn_module, world_size)
    selected = torch.arange(len(batch), device=batch.images.device)
    loss = _learn(method, learn_module, batch, selected, cfg, world_size)
    return StepOutput(loss, selected, scored=0, learned=len(selected) * world_size)


def select_and_learn_step(
    method: StepMethod,
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: StepSettings,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
    learn_module: nn.Module | None = None,
    scorer: nn.Module | None = None,
) -> StepOutput:
    """Score the super-batch with ``model`` (no grad; through ``scorer``, its bf16 copy, when given), select
    b with ``method.selector``, learn on the selection through ``learn_module`` (default: the model)."""
    _check_sizes(batch, cfg, world_size, exact=False)
    learn_module = _learning_module(model, learn_module, world_size)
    learner = None
    if method.scores_with_learner(cfg.scoring):
        learner = score_embeddings(model, batch, method.scoring_approx(cfg), generator, scorer)
    selected = _select(method, learner, batch, cfg, generator, world_size)
    approx_part = None
    if method.learns_approx:  # a random share: selection order is not random
        order = torch.randperm(len(selected), generator=generator, device=selected.device)
        approx_part = order[: round(method.learned_approx_fraction(cfg) * len(selected))]
    loss = _learn(method, learn_module, batch, selected, cfg, world_size, approx_part, generator)
    score = None
    if world_size == 1:  # the sub-batch score would need every rank's embeddings
        score = float(batch_score(learner, batch.reference, selected, scoring=cfg.scoring, loss=cfg.loss))
    scored = len(batch) * world_size if learner is not None else 0
    return StepOutput(loss, selected, scored, len(selected) * world_size, score)
