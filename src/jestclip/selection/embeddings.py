"""The input of every selection function: one model's embeddings of a super-batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Embeddings", "usable_rows"]


def _as_finite_float(name: str, value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised image and text embeddings of B pairs from one model.

    image: ``[B, D]``; text: ``[B, D]`` (row i of each belongs to pair i).
    scale: the logit multiplier, i.e. ``exp(log_scale)`` (> 0), not the log.
    bias: the additive logit bias of a sigmoid (SigLIP) model; softmax losses ignore it.
    Scalar tensors are accepted for ``scale`` and ``bias`` and stored as Python floats.
    """

    image: Tensor
    text: Tensor
    scale: float
    bias: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image", "text"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise ValueError(f"Embeddings.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 2:
                raise ValueError(f"Embeddings.{name} must have shape [B, D], got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"Embeddings.{name} must be floating point, got {t.dtype}")
        if self.image.shape != self.text.shape:
            raise ValueError(
                f"Embeddings.image {tuple(self.image.shape)} and Embeddings.text {tuple(self.text.shape)} "
                "must have the same shape"
            )
        if self.image.device != self.text.device:
            raise ValueError(
                f"Embeddings.image is on {self.image.device} but Embeddings.text is on {self.text.device}"
            )
        scale = _as_finite_float("Embeddings.scale", self.scale)
        if scale <= 0:
            raise ValueError(
                f"Embeddings.scale must be > 0 (the multiplier exp(log_scale), not its log), got {scale}"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bias", _as_finite_float("Embeddings.bias", self.bias))

    @property
    def n(self) -> int:
        """Number of pairs B."""
        return self.image.shape[0]

    @property
    def dim(self) -> int:
        return self.image.shape[1]

    @property
    def device(self) -> torch.device:
        return self.image.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype sums are accumulated in: at least float32 (float64 inputs stay float64)."""
        return torch.promote_types(self.image.dtype, torch.float32)

    def take(self, indices: Tensor) -> Embeddings:
        """The embeddings of the pairs ``indices`` (``[n]``), with the same scale and bias."""
        return Embeddings(self.image[indices], self.text[indices], self.scale, self.bias)


def usable_rows(emb: Embeddings) -> Tensor:
    """``[B]`` bool: pairs whose image and text embeddings are all finite."""
    return torch.isfinite(emb.image).all(dim=1) & torch.isfinite(emb.text).all(dim=1)
