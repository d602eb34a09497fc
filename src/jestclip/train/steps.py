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

__all__ = ["METHODS", "MethodConfig", "StepOutput", "SuperBatchTensors", "contrastive_loss", "run_step"]

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
def _score_embeddings(model: nn.Module, batch: SuperBatchTensors, approx: Approximation | None) -> Embeddings:
    was_training = model.training
    model.eval()
    try:
        image, text = _embed(model, batch.images, batch.tokens, approx)
    finally:
        model.train(was_training)
    scale, bias = logit_params(model)
    return Embeddings(image.float(), text.float(), scale.detach(), bias.detach())


def _select(
    model: nn.Module, batch: SuperBatchTensors, cfg: MethodConfig, generator, world_size: int
) -> tuple[Tensor, int, float | None]:
    approx = cfg.approx if cfg.method == "flexi-jest" else None
    needs_learner = cfg.scoring != "easy_reference"
    learner = _score_embeddings(model, batch, approx) if needs_learner else None
    scored = len(batch) * world_size if needs_learner else 0
    if world_size > 1:
        from jestclip.train.distributed import distributed_independent_select, distributed_joint_select

        common = dict(
            size=cfg.batch_size, scoring=cfg.scoring, loss=cfg.loss, gain=cfg.gain, generator=generator
        )
        if cfg.method == "independent":
            if cfg.independent_context != "unconditional":
                raise ValueError(
                    "distributed independent selection supports only independent_context='unconditional'"
                )
            selected = distributed_independent_select(
                learner, batch.reference, method=cfg.independent_method, **common
            )
        else:
            selected, _ = distributed_joint_select(learner, batch.reference, n_chunks=cfg.n_chunks, **common)
        return selected, scored, None  # the sub-batch score would need every rank's embeddings
    if cfg.method == "independent":
        selected = independent_select(
            learner,
            batch.reference,
            size=cfg.batch_size,
            scoring=cfg.scoring,
            loss=cfg.loss,
            context=cfg.independent_context,
            method=cfg.independent_method,
            gain=cfg.gain,
            generator=generator,
        )
    else:
        selected = joint_select(
            learner,
            batch.reference,
            size=cfg.batch_size,
            n_chunks=min(cfg.n_chunks, cfg.batch_size),
            scoring=cfg.scoring,
            loss=cfg.loss,
            gain=cfg.gain,
            generator=generator,
        )
    score = float(batch_score(learner, batch.reference, selected, scoring=cfg.scoring, loss=cfg.loss))
    return selected, scored, score


def run_step(
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
    *,
    world_size: int = 1,
) -> StepOutput:
    """Select (unless IID) and compute the loss to learn on; see the module docstring.

    With ``world_size > 1`` (torch.distributed initialised), ``batch`` is this rank's shard of the super-batch
    ``cfg.batch_size`` the global b; each rank learns on its b / W picks and the loss is computed over the
    whole selection (features all-gathered with gradients). Counts in the output are global.
    """
    local_batch = cfg.batch_size // world_size
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world_size}")
    if cfg.method == "iid":
        if len(batch) != local_batch:
            raise ValueError(
                f"iid learns on the whole batch: got {len(batch)} examples, batch_size {cfg.batch_size}"
            )
        selected, scored, score = torch.arange(len(batch), device=batch.images.device), 0, None
    else:
        if len(batch) < local_batch:
            raise ValueError(f"super-batch of {len(batch)} is smaller than batch_size {cfg.batch_size}")
        selected, scored, score = _select(model, batch, cfg, generator, world_size)
    images, tokens = batch.images[selected], batch.tokens[selected]
    scale, bias = logit_params(model)
    if cfg.method == "flexi-jest":
        # a random split: selection order is not random (early chunks are the unconditional picks)
        order = torch.randperm(len(selected), generator=generator, device=selected.device)
        n_approx = round(cfg.approx_fraction * len(selected))
        approx_part, full_part = order[:n_approx], order[n_approx:]
        parts = []
        if len(full_part):
            parts.append(_embed(model, images[full_part], tokens[full_part], None))
        if len(approx_part):
            parts.append(_embed(model, images[approx_part], tokens[approx_part], cfg.approx))
        image = torch.cat([p[0] for p in parts])
        text = torch.cat([p[1] for p in parts])
    else:
        image, text = _embed(model, images, tokens, None)
    if world_size > 1:
        from jestclip.train.distributed import all_gather_with_grad

        image, text = all_gather_with_grad(image), all_gather_with_grad(text)
    loss = contrastive_loss(image, text, scale, bias, cfg.loss)
    return StepOutput(
        loss=loss, selected=selected, scored=scored, learned=len(selected) * world_size, selected_score=score
    )
