"""Models: open_clip models (plus tiny shipped configs for CPU work), approximate learners for Flexi-JEST."""

from jestclip.models.approx import APPROXIMATIONS, Approximation, encode_image, patch_size
from jestclip.models.embed import reference_embedder, reference_logits
from jestclip.models.factory import (
    CONFIG_DIR,
    create_model,
    image_size,
    image_transform,
    logit_params,
    model_fingerprint,
    pretrained_cfg,
    shipped_configs,
    tokenizer,
)
from jestclip.models.flops import ForwardFlops, StepFlops, forward_flops, step_flops

__all__ = [
    "APPROXIMATIONS",
    "CONFIG_DIR",
    "Approximation",
    "ForwardFlops",
    "StepFlops",
    "create_model",
    "encode_image",
    "forward_flops",
    "image_size",
    "image_transform",
    "logit_params",
    "model_fingerprint",
    "patch_size",
    "pretrained_cfg",
    "reference_embedder",
    "reference_logits",
    "shipped_configs",
    "step_flops",
    "tokenizer",
]
