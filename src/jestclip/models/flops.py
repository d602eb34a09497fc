"""FLOP accounting: forward FLOPs measured with ``torch.utils.flop_counter``; step costs per appendix A.4.

Per example, training costs 3 forward passes (forward + backward ~ 2 forwards). With learner forward F,
approximate learner forward F_A, reference forward F_ref and super-batch B, sub-batch b:

- iid:          train 3F·b
- jest:         score F·B (learner on the super-batch); train 2F·b when the chosen b's scoring forward is
                reused (the paper's accounting), 3F·b when it is recomputed with gradients (jestclip's step)
- independent:  as jest
- flexi-jest:   score F_A·B (approximate, not reusable); train 3·(λ·F_A + (1-λ)·F)·b, λ = approximate fraction
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
        encode_image(model, torch.zeros(n, 3, image_size, image_size, device=device), approx)

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
    method: str,
    *,
    batch: int,
    super_batch: int,
    learner: ForwardFlops,
    approx_learner: ForwardFlops | None = None,
    reference: ForwardFlops | None = None,
    reference_cached: bool = True,
    approx_fraction: float = 0.5,
    reuse_scoring_forward: bool = False,
) -> StepFlops:
    """Per-step FLOPs of ``method`` ("iid", "jest", "independent", "flexi-jest"); see the module docstring.

    reuse_scoring_forward: count jest's training forward as shared with scoring (appendix A.4). jestclip's
    ``run_step`` scores without gradients and recomputes the forward of the chosen b, so it is False there.
    """
    f = learner.total
    if method == "iid":
        return StepFlops(train=3.0 * f * batch, score=0.0, reference=0.0)
    if method not in ("jest", "independent", "flexi-jest"):
        raise ValueError(f"unknown method {method!r}")
    if super_batch < batch:
        raise ValueError(f"super_batch ({super_batch}) must be >= batch ({batch})")
    ref = 0.0
    if not reference_cached:
        if reference is None:
            raise ValueError("reference FLOPs are needed when the reference is not cached")
        ref = float(reference.total) * super_batch
    if method in ("jest", "independent"):
        passes = 2.0 if reuse_scoring_forward else 3.0
        return StepFlops(train=passes * f * batch, score=float(f) * super_batch, reference=ref)
    if approx_learner is None:
        raise ValueError("flexi-jest needs the approximate learner's FLOPs")
    fa = approx_learner.total
    train = 3.0 * (approx_fraction * fa + (1 - approx_fraction) * f) * batch
    return StepFlops(train=train, score=float(fa) * super_batch, reference=ref)
