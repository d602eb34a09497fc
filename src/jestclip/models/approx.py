"""Approximate image encoders for Flexi-JEST: cheaper forward passes that share the learner's weights.

- ``"flexi"``: FlexiViT patch size x2 — the patch-embedding kernel is PI-resized and the position
  embeddings resampled to the coarser grid (timm's ``resample_patch_embed`` / ``resample_abs_pos_embed``);
  a quarter of the tokens.
- ``"resolution"``: the image downsampled by 2 with the same patch size and resampled position embeddings.
- ``"patch_drop"``: a random ``keep`` fraction of the patch tokens (the class token always stays), drawn
  from the ``generator`` given.

All three are differentiable in the original parameters, so training on approximate forward passes updates
the full-resolution model (multi-resolution training, section 3.3).

``encode_image(model, images, approx=None)`` equals ``model.encode_image`` exactly; the approximate paths
rebuild only the token embedding of open_clip's ``VisionTransformer`` and reuse its transformer, pooling and
projection.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import Tensor, nn

__all__ = ["APPROXIMATIONS", "Approximation", "encode_image", "patch_size"]

Approximation = Literal["flexi", "resolution", "patch_drop"]
APPROXIMATIONS: tuple[str, ...] = ("flexi", "resolution", "patch_drop")


def _vit(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"approximate image encoding needs an open_clip VisionTransformer, got {type(visual).__name__}"
        )
    if visual.attn_pool is not None:
        raise ValueError("approximate image encoding does not support attention-pooled towers")
    return visual


def patch_size(model: nn.Module) -> int:
    return int(_vit(model).conv1.kernel_size[0])


def _tokens(
    visual: VisionTransformer, images: Tensor, kernel: Tensor, stride: int, grid: tuple[int, int]
) -> Tensor:
    """Patch tokens with class token and position embeddings: ``[N, 1 + grid², width]`` (before ln_pre)."""
    x = F.conv2d(images, kernel.to(images.dtype), stride=stride)  # [N, width, gh, gw]
    if tuple(x.shape[-2:]) != tuple(grid):
        raise ValueError(
            f"images of size {tuple(images.shape[-2:])} give a {tuple(x.shape[-2:])} grid, not {grid}"
        )
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if tuple(grid) != tuple(visual.grid_size):
        pos = resample_abs_pos_embed(
            pos.unsqueeze(0), list(grid), list(visual.grid_size), num_prefix_tokens=1
        )[0]
    return x + pos.to(x.dtype)


def _finish(visual: VisionTransformer, x: Tensor) -> Tensor:
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_image(
    model: nn.Module,
    images: Tensor,
    approx: Approximation | None = None,
    *,
    keep: float = 0.25,
    generator: torch.Generator | None = None,
    normalize: bool = False,
) -> Tensor:
    """Image embeddings ``[N, E]`` of ``images`` (``[N, 3, H, W]``), exact or approximate.

    keep: fraction of patch tokens kept by ``"patch_drop"``; generator: its random choice of tokens (on the
    images' device; None draws from the global torch RNG, which a training run must not do: its resume would
    depend on every other draw from it — ``train.steps`` passes the run's own generator).
    """
    if approx is None:
        features = model.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS} or None, got {approx!r}")
    visual = _vit(model)
    p = patch_size(model)
    gh, gw = visual.grid_size
    if approx == "flexi":
        if gh % 2 or gw % 2:
            raise ValueError(f"patch size x2 needs an even patch grid, got {gh}x{gw}")
        kernel = resample_patch_embed(visual.conv1.weight, [2 * p, 2 * p])
        x = _tokens(visual, images, kernel, 2 * p, (gh // 2, gw // 2))
    elif approx == "resolution":
        if gh % 2 or gw % 2:
            raise ValueError(f"half resolution needs an even patch grid, got {gh}x{gw}")
        small = F.interpolate(  # in float32: antialiased resizing has no bf16 CPU kernel
            images.float(), scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False
        ).to(images.dtype)
        x = _tokens(visual, small, visual.conv1.weight, p, (gh // 2, gw // 2))
    else:
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        x = _tokens(visual, images, visual.conv1.weight, p, (gh, gw))
        n_patches = x.shape[1] - 1
        n_keep = max(1, round(keep * n_patches))
        scores = torch.rand(x.shape[0], n_patches, generator=generator, device=x.device)
        chosen = scores.topk(n_keep, dim=1).indices + 1
        index = torch.cat([torch.zeros_like(chosen[:, :1]), chosen], dim=1)
        x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    features = _finish(visual, x)
    return F.normalize(features, dim=-1) if normalize else features
