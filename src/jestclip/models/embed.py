"""Glue from an open_clip model to what the reference cache takes: an embedding function, scale and bias."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestclip.models.factory import logit_params

__all__ = ["reference_embedder", "reference_logits"]


def reference_embedder(
    model: nn.Module,
    tokenize: Callable[[list[str]], Tensor],
    device: str | torch.device = "cpu",
    *,
    bf16: bool | None = None,
) -> Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]:
    """An embedding function for ``jestclip.data.caching.cache_reference`` from the frozen ``model``.

    The model is moved to ``device`` and put in eval mode; ``embed(images [n, 3, H, W], n captions)`` returns
    L2-normalised ``(image [n, D], text [n, D])`` on ``device``, without gradients. ``bf16``: run the forward
    under bf16 autocast (default: on CUDA; the cache stores float16 rows either way).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    bf16 = device.type == "cuda" if bf16 is None else bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def embed(images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        with autocast:
            image = model.encode_image(images.to(device, non_blocking=True))
            text = model.encode_text(tokenize(texts).to(device, non_blocking=True))
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    return embed


def reference_logits(model: nn.Module) -> tuple[float, float]:
    """The model's logit multiplier ``exp(logit_scale)`` and bias as floats (what the cache records)."""
    scale, bias = logit_params(model)
    return float(scale.detach()), float(bias.detach())
