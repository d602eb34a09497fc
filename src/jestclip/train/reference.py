"""The reference model's cache: a frozen open_clip model, built from its name and weights, embeds the pool
with its own preprocessing and tokenizer; ``data.refcache`` stores the embeddings next to each shard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jestclip.data.refcache import cache_reference
from jestclip.models import (
    create_model,
    image_transform,
    model_fingerprint,
    reference_embedder,
    reference_logits,
    tokenizer,
)

__all__ = ["cache_reference_model"]


def cache_reference_model(
    model_name: str,
    shards: str | Path | Sequence[str | Path],
    *,
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    loss: str = "sigmoid",
    device: str = "auto",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Embed every sample of ``shards`` with reference ``model_name`` (weights from ``checkpoint`` and/or
    open_clip tag ``pretrained``) and write sidecars named ``name``; returns ``cache_reference``'s counts.

    With a tag, images and captions are preprocessed and tokenised as those weights were trained, and the
    cache records the model as ``NAME@TAG``. device: "auto" is cuda when available.
    """
    if checkpoint is None and pretrained is None:
        raise ValueError("the reference model needs weights: a checkpoint or a pretrained tag")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = image_transform(model_name, pretrained=pretrained)
    tokenize = tokenizer(model_name, pretrained=pretrained)
    model = create_model(model_name, loss=loss, checkpoint=checkpoint, pretrained=pretrained, device=device)
    scale, bias = reference_logits(model)
    return cache_reference(
        reference_embedder(model, tokenize, device),
        shards,
        model_name=model_name if pretrained is None else f"{model_name}@{pretrained}",
        fingerprint=model_fingerprint(model),
        scale=scale,
        bias=bias,
        transform=transform,
        name=name,
        batch_size=batch_size,
    )
