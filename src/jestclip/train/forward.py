"""The learning forward of a step: the features and logit parameters it learns from.

A step learns through one module, ``LearningForward(model)``: the features and logit parameters of the
selected examples, every learning forward of the step in one call (scoring runs outside it, without
gradients, on the model itself). Under torchrun it is the module ``distributed.data_parallel`` wraps in
``DistributedDataParallel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestclip.models.approx import Approximation, encode_image
from jestclip.models.factory import logit_params

__all__ = ["LearningForward", "embed"]


def embed(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    approx: Approximation | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """L2-normalised ``[n, D]`` image (encoded with ``approx``; None: exactly) and text features;
    ``generator`` draws the patches ``"patch_drop"`` keeps (the run's own: a resume stays bitwise)."""
    image = encode_image(model, images, approx, normalize=True, generator=generator)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


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
            image, text = embed(self.model, images, tokens, None)
        else:
            exact = torch.ones(len(images), dtype=torch.bool, device=images.device)
            exact[approx_part] = False
            parts = [
                embed(self.model, images[mask], tokens[mask], part_approx, generator)
                for mask, part_approx in ((exact, None), (~exact, approx))
                if bool(mask.any())
            ]
            image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        scale, bias = logit_params(self.model)
        return image, text, scale, bias
