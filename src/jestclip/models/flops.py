"""FLOP accounting: forward FLOPs measured with ``torch.utils.flop_counter``; step costs per appendix A.4.

Per example, training costs 3 forward passes (forward + backward ~ 2 forwards). With learner forward F,
approximate learner forward F_A, reference forward F_ref and super-batch B, sub-batch b, the methods
(described in ``jestclip.train.methods``) cost:

- iid:          train 3F·b
- jest:         score F·B (learner on the super-batch); train 2F·b when the chosen b's scoring forward is
                reused (the paper's accounting), 3F·b when it is recomputed with gradients (jestclip's step)
- independent:  as jest
- flexi-jest:   score F_A·B (approximate, not reusable); train 3·(λ·F_A + (1-λ)·F)·b, λ = approximate fraction
- scoring ``easy_reference``: no learner scoring pass (score 0)
- reference:    F_ref·B per step, or 0 when its embeddings are cached

so that relative to IID, jest costs (2 + B/b)/3 (7/3 at f = 0.8; 8/3 without reuse) and flexi-jest with
F_A = F/4 costs 1.04.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jestclip.models.approx import Approximation, encode_image

__all__ = ["ForwardFlops", "StepFlops", "forward_flops", "step_flops"]


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one example: image tower (at a resolution/approximation) and text tower."""

    image: int
    text: int

    @property
    def total(self) -> int:
        return self.image + self.text


def forward_flops(
    model: nn.Module, *, image_size: int, context_length: int, approx: Approximation | None = None
) -> ForwardFlops:
    """Measure the forward FLOPs of one image and one caption.

    Counted as the marginal cost of two more examples (batch 4 minus batch 2, halved), so per-call work that
    does not grow with the batch — such as PI-resizing the patch kernel — is not charged to every example.
    Attention runs on SDPA's math backend with autograd on: the fused kernels (``nn.MultiheadAttention``'s
    inference fast path, CPU flash attention) are invisible to ``FlopCounterMode``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def count(fn, n: int) -> int:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            fn(n)
        return counter.get_total_flops()

    def image_pass(n: int) -> None:
        images = torch.zeros(n, 3, image_size, image_size, device=device)
        encode_image(model, images, approx, generator=torch.Generator(device).manual_seed(0))  # not global

    def text_pass(n: int) -> None:
        model.encode_text(torch.zeros(n, context_length, dtype=torch.long, device=device))

    try:
        image = (count(image_pass, 4) - count(image_pass, 2)) // 2
        text = (count(text_pass, 4) - count(text_pass, 2)) // 2
    finally:
        model.train(was_training)
    return ForwardFlops(image=image, text=text)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, split as in appendix A.4."""

    train: float  # learner forward + backward on the b examples learned on
    score: float  # learner (or approximate learner) forward on the B candidates
    reference: float  # reference forward on the B candidates (0 when cached)

    @property
    def total(self) -> float:
        return self.train + self.score + self.reference


def step_flops(
    *,
    batch: int,
    super_batch: int,
    learner: ForwardFlops,
    scorer: ForwardFlops | None = None,
    approx_learner: ForwardFlops | None = None,
    approx_fraction: float = 0.0,
    reference: ForwardFlops | None = None,
    reuse_scoring_forward: bool = False,
) -> StepFlops:
    """Per-step FLOPs from what a step runs (appendix A.4); ``train.methods`` says what each method runs.

    learner: the learner's forward F. scorer: the forward that scores the ``super_batch`` candidates (F, an
    approximation F_A, or None when the learner does not score). approx_learner / approx_fraction: learn on
    that fraction λ of the ``batch`` with F_A (train = 3·((1-λ)·F + λ·F_A)·b). reference: the reference
    forward run on every candidate (None when its embeddings are cached). reuse_scoring_forward: count the
    training forward of the chosen b as shared with an exact scoring pass (the paper's accounting; jestclip's
    steps score without gradients and recompute it).
    """
    if super_batch < batch:
        raise ValueError(f"super_batch ({super_batch}) must be >= batch ({batch})")
    if not 0.0 <= approx_fraction <= 1.0:
        raise ValueError(f"approx_fraction must be in [0, 1], got {approx_fraction}")
    if approx_fraction and approx_learner is None:
        raise ValueError("learning on an approximation needs the approximate learner's FLOPs")
    if reuse_scoring_forward and scorer != learner:
        raise ValueError("only an exact learner scoring pass can be reused for training")
    approx = approx_learner.total if approx_learner is not None else 0
    per_example = (1.0 - approx_fraction) * learner.total + approx_fraction * approx
    train = 3.0 * per_example * batch - (learner.total * batch if reuse_scoring_forward else 0.0)
    score = float(scorer.total) * super_batch if scorer is not None else 0.0
    ref = float(reference.total) * super_batch if reference is not None else 0.0
    return StepFlops(train=train, score=score, reference=ref)
