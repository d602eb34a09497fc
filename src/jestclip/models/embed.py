"""Glue from an open_clip model to what the reference cache takes: an embedding function, scale and bias."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestclip.models.factory import logit_params

__all__ = ["reference_embedder", "reference_logits"]


def reference_embedder(
    model: nn.Module, tokenize: Callable[[list[str]], Tensor], device: str | torch.device = "cpu"
) -> Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]:
    """An embedding function for ``jestclip.data.refcache.cache_reference`` from the frozen ``model``.

    The model is moved to ``device`` and put in eval mode; ``embed(images [n, 3, H, W], n captions)`` returns
    L2-normalised ``(image [n, D], text [n, D])`` on ``device``, without gradients.
    """
    model = model.to(device).eval()

    @torch.no_grad()
    def embed(images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        image = F.normalize(model.encode_image(images.to(device)), dim=-1)
        text = F.normalize(model.encode_text(tokenize(texts).to(device)), dim=-1)
        return image, text

    return embed


def reference_logits(model: nn.Module) -> tuple[float, float]:
    """The model's logit multiplier ``exp(logit_scale)`` and bias as floats (what the cache records)."""
    scale, bias = logit_params(model)
    return float(scale.detach()), float(bias.detach())
