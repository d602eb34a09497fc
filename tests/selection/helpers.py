"""Generated embeddings for selection tests."""

from __future__ import annotations

import torch

from jestclip.selection import Embeddings


def make_embeddings(
    n: int,
    dim: int = 8,
    *,
    seed: int = 0,
    scale: float = 10.0,
    bias: float = -10.0,
    noise: float = 0.8,
    dtype: torch.dtype = torch.float64,
) -> Embeddings:
    """L2-normalised pairs whose text is a noisy copy of the image (so pairs are partly aligned)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    text = image + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    text = torch.nn.functional.normalize(text, dim=1)
    return Embeddings(image.to(dtype), text.to(dtype), scale, bias)


def learner_and_reference(n: int, dim: int = 8, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A learner and a reference model embedding the same n pairs differently."""
    learner = make_embeddings(n, dim, seed=seed, scale=10.0, bias=-10.0, noise=1.2, dtype=dtype)
    reference = make_embeddings(n, dim + 4, seed=seed + 1000, scale=14.0, bias=-6.0, noise=0.5, dtype=dtype)
    return learner, reference


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
