"""Argument checks shared by the selection functions (each raises a ValueError naming the argument) and
``full_precision``, which keeps their arithmetic out of any autocast region."""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = ["check_count", "check_gain", "check_generator", "check_indices", "full_precision"]

P = ParamSpec("P")
R = TypeVar("R")

# device types torch.autocast knows and a selection may run on
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def full_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with every active autocast disabled, so scores and sampling use the embeddings' own dtype
    (at least float32, see ``Embeddings.compute_dtype``) whatever region the caller is in.

    Selection multiplies pair logits by a gain of 100: under bf16 autocast a logit tile's rounding (~0.01)
    becomes ~1 in the sampling logits and changes which candidates are drawn.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


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
    integer = isinstance(indices, Tensor) and not (
        indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool
    )
    if not integer or indices.ndim != 1:  # a bool mask is not a list of indices
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
