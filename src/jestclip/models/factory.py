"""Creating open_clip models (never downloading anything unless a pretrained tag is asked for).

``jest-micro`` (tests), ``jest-tiny`` (demo) and ``jest-small`` are shipped configs for CPU work; any
open_clip model name works too. The contrastive loss decides the logit initialisation (appendix A.1 /
SigLIP): sigmoid starts at scale 10 and bias -10, softmax at scale 1/0.07 with no bias.

A pretrained tag (``open_clip.list_pretrained()``) brings the weights' own preprocessing: open_clip keeps
mean, std, interpolation and resize mode per (model, tag) and the activation (QuickGELU) they were trained
with; ``image_transform(name, pretrained=tag)`` builds that eval transform from the config alone.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn

__all__ = [
    "CONFIG_DIR",
    "LOGIT_INIT",
    "create_model",
    "image_size",
    "image_transform",
    "logit_params",
    "model_fingerprint",
    "pretrained_cfg",
    "shipped_configs",
    "tokenizer",
]

CONFIG_DIR = Path(__file__).parent / "configs"
LOGIT_INIT: dict[str, dict[str, float | None]] = {
    "sigmoid": {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0},
    "softmax": {"init_logit_scale": math.log(1 / 0.07), "init_logit_bias": None},
}
_registered = False


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _register() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _check_name(name: str) -> None:
    _register()
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model config {name!r}; shipped: {shipped_configs()}, or any open_clip model"
        )


def pretrained_cfg(name: str, pretrained: str) -> dict[str, Any]:
    """open_clip's config of tag ``pretrained`` for model ``name`` (weights' address, mean, std,
    interpolation, resize_mode, quick_gelu); a ValueError naming the known tags when there is none."""
    _check_name(name)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for model {name!r}; open_clip has {tags or 'none'}"
        )
    return cfg


class _QuietNoPretrained(logging.Filter):
    """Drop open_clip's "No pretrained weights loaded" line on the root logger while inside ``with``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self)

    def __exit__(self, *_: object) -> None:
        logging.getLogger().removeFilter(self)


def create_model(
    name: str,
    *,
    loss: str = "sigmoid",
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """An open_clip CLIP model by config name, randomly initialised for ``loss``.

    checkpoint: a local file of weights (an open_clip checkpoint or a bare state dict) loaded with
    ``weights_only=True``. pretrained: an open_clip pretrained tag; this downloads, so it is only for users
    with internet access and is never used by tests. A tag trained with QuickGELU gets it (open_clip only
    warns when the model config lacks it).
    """
    if loss not in LOGIT_INIT:
        raise ValueError(f"loss must be one of {sorted(LOGIT_INIT)}, got {loss!r}")
    _check_name(name)
    init = LOGIT_INIT[loss]
    kwargs = {"init_logit_scale": init["init_logit_scale"]}
    if init["init_logit_bias"] is not None:
        kwargs["init_logit_bias"] = init["init_logit_bias"]
    if pretrained is not None and pretrained_cfg(name, pretrained).get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    with _QuietNoPretrained():  # a random init (then our checkpoint) is what was asked for
        model = open_clip.create_model(name, pretrained=pretrained, device=device, **kwargs)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exn:  # shape mismatches
            lines = [ln.strip() for ln in str(exn).splitlines() if "size mismatch" in ln]
            raise ValueError(
                f"checkpoint {checkpoint} does not fit model {name!r}: {'; '.join(lines[:3])}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {checkpoint} does not fit model {name!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return model


def logit_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit multiplier ``exp(logit_scale)`` and bias (zero when the model has none), 0-dim tensors."""
    scale = model.logit_scale.exp()
    bias = model.logit_bias if getattr(model, "logit_bias", None) is not None else torch.zeros_like(scale)
    return scale.reshape(()), bias.reshape(())


def tokenizer(name: str, pretrained: str | None = None) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for model ``name``: list of B captions -> ``[B, context_length]`` token ids.

    open_clip's tags carry no tokenizer settings (the model config's text_cfg decides), so ``pretrained``
    only checks that the tag exists for ``name``.
    """
    if pretrained is not None:
        pretrained_cfg(name, pretrained)
    _register()
    return open_clip.get_tokenizer(name)


def image_size(name: str) -> int:
    """The side in pixels of model ``name``'s square input (the larger side, were it not square)."""
    _check_name(name)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return max(size) if isinstance(size, (list, tuple)) else int(size)


def image_transform(name: str, *, pretrained: str | None = None, train: bool = False) -> Callable:
    """open_clip's preprocessing for model ``name``: resize, crop, normalise (and augment if ``train``).

    Without ``pretrained`` it is open_clip's default (CLIP mean/std, bicubic, shortest-side resize and
    center crop); with a tag it is the one those weights were trained with, as
    ``open_clip.create_model_and_transforms(name, pretrained=tag)`` returns it, built without downloading.
    """
    size = image_size(name)
    if pretrained is None:
        return open_clip.image_transform(size, is_train=train)
    cfg = merge_preprocess_dict(PreprocessCfg(size=size), pretrained_cfg(name, pretrained))
    return image_transform_v2(PreprocessCfg(**cfg), is_train=train)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, shapes, values): equal iff the weights are equal."""
    digest = hashlib.sha1()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
