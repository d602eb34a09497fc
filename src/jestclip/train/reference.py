"""The reference model's cache: a frozen open_clip model, built from its name and weights, embeds the pool
with its own preprocessing and tokenizer; ``data.refcache`` stores the embeddings next to each shard (or in a
cache directory, for shards behind a URL)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jestclip.data.caching import cache_reference
from jestclip.models import (
    create_model,
    image_transform,
    model_fingerprint,
    reference_embedder,
    reference_logits,
    tokenizer,
)
from jestclip.train.trained import weights_loss

__all__ = ["cache_model_embeddings", "cache_reference_model"]


def cache_model_embeddings(
    model: torch.nn.Module,
    model_name: str,
    shards: str | Path | Sequence[str | Path],
    *,
    name: str = "reference",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every sample of ``shards`` with the frozen ``model`` (config ``model_name``, weights of open_clip
    tag ``pretrained`` if any) and write sidecars named ``name``; returns ``cache_reference``'s counts (summed
    over ranks under torchrun, each rank caching its share of the shards).

    Images and captions are preprocessed and tokenised as ``model_name`` (with ``pretrained``: as those
    weights were trained); the sidecars record the model as ``NAME`` or ``NAME@TAG``, its fingerprint and its
    logit scale and bias. cache_dir: where the sidecars go (None: beside each local shard; needed for shards
    behind a URL).
    """
    scale, bias = reference_logits(model)
    return cache_reference(
        reference_embedder(model, tokenizer(model_name, pretrained=pretrained), device),
        shards,
        model_name=model_name if pretrained is None else f"{model_name}@{pretrained}",
        fingerprint=model_fingerprint(model),
        scale=scale,
        bias=bias,
        transform=image_transform(model_name, pretrained=pretrained),
        name=name,
        batch_size=batch_size,
        cache_dir=cache_dir,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        progress=progress,
    )


def cache_reference_model(
    model_name: str,
    shards: str | Path | Sequence[str | Path],
    *,
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    loss: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """``cache_model_embeddings`` for reference ``model_name`` built with weights from ``checkpoint`` and/or
    open_clip tag ``pretrained``; ``loss`` None: the one ``checkpoint`` was trained with (a logit bias means
    sigmoid), sigmoid without one. device: "auto" is cuda when available (under torchrun, the GPU of
    ``LOCAL_RANK``). num_workers: decoding processes (default: 4 on CUDA, none on the CPU, whose cores the
    model uses)."""
    if checkpoint is None and pretrained is None:
        raise ValueError("the reference model needs weights: a checkpoint or a pretrained tag")
    if loss is None:
        loss = weights_loss(checkpoint) if checkpoint is not None else "sigmoid"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(torch.device(device))
    if num_workers is None:
        num_workers = 4 if torch.device(device).type == "cuda" else 0
    model = create_model(model_name, loss=loss, checkpoint=checkpoint, pretrained=pretrained, device=device)
    return cache_model_embeddings(
        model,
        model_name,
        shards,
        name=name,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        cache_dir=cache_dir,
        num_workers=num_workers,
    )
