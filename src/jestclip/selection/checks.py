"""Argument checks shared by the selection functions: each raises a ValueError naming the argument."""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = ["check_count", "check_gain", "check_generator", "check_indices"]


def check_count(value: object, name: str, low: int, high: int, high_name: str, caller: str) -> int:
    """``value`` as an int in ``[low, high]`` (any integer type; bools and floats are refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{caller}: {name} must be an int in [{low}, {high_name}={high}], got {value!r}"
        ) from None
    if not low <= count <= high:
        raise ValueError(f"{caller}: {name} must be an int in [{low}, {high_name}={high}], got {count}")
    return count


def check_gain(gain: float, caller: str) -> float:
    """``gain`` as a finite float >= 0."""
    try:
        gain = float(gain)
    except (TypeError, ValueError):
        raise ValueError(f"{caller}: gain must be a real number, got {gain!r}") from None
    if not math.isfinite(gain) or gain < 0:
        raise ValueError(f"{caller}: gain must be finite and >= 0, got {gain}")
    return gain


def check_generator(generator: torch.Generator | None, device: torch.device, caller: str) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{caller}: generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"{caller}: generator is on {generator.device} but the embeddings are on {device}")


def check_indices(indices: Tensor, n: int, device: torch.device, name: str, caller: str) -> Tensor:
    """Validate a 1-D tensor of distinct candidate indices in ``[0, n)``."""
    if not isinstance(indices, Tensor) or indices.ndim != 1 or indices.is_floating_point():
        raise ValueError(f"{caller}: {name} must be a 1-D integer tensor of candidate indices")
    if indices.device != device:
        raise ValueError(f"{caller}: {name} is on {indices.device} but the embeddings are on {device}")
    indices = indices.long()
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{caller}: {name} must lie in [0, {n}), got values in [{lo}, {hi}]")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"{caller}: {name} contains duplicate indices")
    return indices
